"""Any data: plain Datasets, DataLoaders, 1-D signals, channels-last and integer images, vectors,
two-view data sets and user transforms, through the trainer, the embedding helpers and the evaluators."""

import copy

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import coreset_ext as cx
from coreset_ext.train import SignalAugment, TrainConfig, Trainer, VectorAugment, as_data, load_dataset
from coreset_ext.train.augment import Augment
from coreset_ext.train.data import ArrayDataset, sample_layout
from coreset_ext.train.embed import proxy_embeddings
from coreset_ext.train.evaluate import extract_features, ssl_probe_accuracy, train_from_scratch

TINY = dict(epochs=1, batch_size=16, width=4, proj_dim=8, proj_hidden=16, queue_size=32, progress=False, device="cpu")


def _fixed_views(x, generator):
    """Two different deterministic views per step (the trainer calls it twice per batch)."""
    _fixed_views.calls += 1
    return x if _fixed_views.calls % 2 else x.flip(-1) * 0.5


@pytest.mark.parametrize("shape,modality,canonical", [
    ((1, 1, 40), "signal", (1, 40)), ((1, 40, 1), "signal", (1, 40)), ((3, 40), "signal", (3, 40)),
    ((1, 1, 1), "vector", (1,)), ((64, 1, 1), "vector", (64,)), ((7, 1), "vector", (7,)), ((7,), "vector", (7,)),
    ((16, 16, 3), "image", (3, 16, 16)), ((10, 12, 1), "image", (1, 10, 12)), ((3, 16, 16), "image", (3, 16, 16)),
    ((5, 8, 8), "image", (5, 8, 8)), ((3, 4, 4), "image", (3, 4, 4)), ((2, 2, 2), "image", (2, 2, 2)),
])
def test_sample_layout_reads_the_modality_from_the_shape(shape, modality, canonical):
    layout = sample_layout(shape)
    assert (layout.modality, layout.shape) == (modality, canonical)
    x = torch.arange(3 * int(np.prod(shape))).reshape(3, *shape)
    out = layout.canonical(x)
    assert out.shape == (3, *canonical)
    if layout.channels_last:  # the same values, moved: pixel (h, w) of channel c
        assert torch.equal(out, x.permute(0, 3, 1, 2))
    else:
        assert torch.equal(out.reshape(3, -1), x.reshape(3, -1))


def test_a_shape_no_modality_fits_names_it_and_the_way_out():
    with pytest.raises(ValueError, match=r"shape \(2, 3, 4, 5\) fit none of the built-in modalities.*transform="):
        sample_layout((2, 3, 4, 5))
    with pytest.raises(ValueError, match=r"item 0 of shape \(2, 3, 4, 5\).*transform="):
        Trainer(TrainConfig(**TINY), TensorDataset(torch.rand(8, 2, 3, 4, 5)))


@pytest.mark.parametrize("shape", [(24, 1, 1, 40), (24, 1, 40, 1), (24, 1, 1, 1), (24, 3, 40)])
def test_signals_and_one_value_examples_train_embed_and_evaluate(tmp_path, shape):
    """The shapes that crashed in the blur and in the scratch evaluator's MaxPool (issue 17)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    y = torch.arange(shape[0]) % 3
    path = tmp_path / "signals.pt"
    torch.save({"signals" if x.dim() == 3 else "images": x, "labels": y}, path)
    ds = load_dataset("tensor", data_dir=path)
    assert ds.kind in ("signals", "embeddings") and ds.data.dim() == (3 if ds.kind == "signals" else 2)
    result = Trainer(TrainConfig(**TINY), ds, tmp_path / "run").fit()
    assert bool(torch.isfinite(result.scores()).all())
    aug = Trainer(TrainConfig(**TINY), ds).augment
    assert isinstance(aug, SignalAugment if ds.kind == "signals" else VectorAugment)
    feats = extract_features(result.model.encoder, ds)
    assert feats.shape[0] == shape[0] and bool(torch.isfinite(feats).all())
    acc = train_from_scratch(ds, torch.arange(12), ds, steps=3, width=4)
    assert 0.0 <= acc <= 1.0


def test_channels_last_uint8_images_are_read_as_three_channels():
    g = torch.Generator().manual_seed(1)
    nhwc = torch.randint(0, 256, (20, 16, 16, 3), dtype=torch.uint8, generator=g)
    for data in (ArrayDataset(nhwc), as_data(TensorDataset(nhwc))):
        assert data.kind == "images" and data.sample_shape == (3, 16, 16)
        x = data.batch(torch.tensor([4, 7]))
        assert torch.equal(x, nhwc[[4, 7]].permute(0, 3, 1, 2).float() / 255)
    trainer = Trainer(TrainConfig(**TINY), TensorDataset(nhwc))
    assert trainer.augment.color_jitter > 0  # colour images get colour jitter: three channels, not sixteen


def test_integer_images_are_scaled_and_out_of_range_ones_refused():
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (6, 1, 8, 8), generator=g)  # int64
    for data in (ArrayDataset(x), as_data(TensorDataset(x, torch.zeros(6, dtype=torch.long)))):
        torch.testing.assert_close(data.batch(torch.arange(6)), x.float() / 255)
    with pytest.raises(ValueError, match=r"integer images must hold values in 0..255.*got 0..300"):
        ArrayDataset(torch.cat([x, torch.full((1, 1, 8, 8), 300)]))
    with pytest.raises(ValueError, match=r"data: integer images must hold values in 0..255"):
        as_data(TensorDataset(x - 5)).batch(torch.arange(6))


def test_plain_tensor_dataset_trains_with_scores_at_its_indices():
    """A TensorDataset of (x, y) with a user's encoder and lr 0: every example's CSS (on the backbone:
    the head's BatchNorm depends on the batch) is the cosine of its two fixed views' embeddings,
    recomputed independently in float64."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(40, 1, 8, 8, generator=g)
    ds = TensorDataset(x, torch.arange(40) % 4)
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 12))
    _fixed_views.calls = 0
    cfg = TrainConfig(**{**TINY, "epochs": 2, "lr": 0.0, "weight_decay": 0.0, "css_on": "backbone"})
    result = Trainer(cfg, ds, augment=_fixed_views, model=encoder).fit()
    assert result.model.encoder is encoder and encoder.out_dim == 12  # width inferred by a dry forward
    ref = copy.deepcopy(result.model.encoder).double()
    with torch.no_grad():
        a, b = ref(x.double()), ref(x.double().flip(-1) * 0.5)
    expect = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    assert torch.equal(result.tracker.counts["css"], torch.full((40,), 2.0))
    torch.testing.assert_close(result.scores().double(), expect, rtol=1e-5, atol=1e-5)
    assert float(expect.std()) > 1e-3
    # the evaluators and embedding helpers read the same plain data set
    torch.testing.assert_close(extract_features(encoder, ds), encoder(x).detach(), rtol=1e-6, atol=1e-6)
    assert 0.0 <= train_from_scratch(ds, torch.arange(20), ds, steps=2, width=4) <= 1.0
    acc = ssl_probe_accuracy(ds, torch.arange(16), ds, train_options={"epochs": 1, "width": 4, "batch_size": 8},
                             probe_steps=5, device="cpu")
    assert 0.0 <= acc <= 1.0


def test_a_data_loader_over_with_index_is_iterated_as_given():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(30, 10, generator=g)
    loader = DataLoader(cx.with_index(TensorDataset(x, torch.arange(30) % 2)), batch_size=8, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    trainer = Trainer(TrainConfig(**{**TINY, "epochs": 2}), loader)
    result = trainer.fit()
    assert trainer._steps_per_epoch() == 4 and trainer.data.kind == "embeddings"
    # every example scored once per epoch, through the loader's own batches (the last one has 6)
    assert torch.equal(result.tracker.counts["css"], torch.full((30,), 2.0))
    assert proxy_embeddings(result.model, loader).shape == (30, result.model.encoder.out_dim)
    with pytest.raises(ValueError, match=r"DataLoader's batches must carry.*with_index"):
        Trainer(TrainConfig(**TINY), DataLoader(TensorDataset(x), batch_size=8))
    with pytest.raises(ValueError, match=r"last batch would hold one example \(30 examples, batch_size 29\)"):
        Trainer(TrainConfig(**TINY), DataLoader(cx.with_index(TensorDataset(x)), batch_size=29))


def test_with_index_yields_index_example_label():
    x = torch.rand(5, 3)
    assert [v if isinstance(v, int) else v.tolist() for v in cx.with_index(TensorDataset(x))[3]] == [3, x[3].tolist(),
                                                                                                    -1]
    i, xi, yi = cx.with_index(TensorDataset(x, torch.arange(5) * 2))[4]
    assert (i, yi) == (4, 8) and torch.equal(xi, x[4])
    with pytest.raises(ValueError, match=r"item 1's label must be a whole-number label"):
        cx.with_index(TensorDataset(x, torch.rand(5)))[1]


class TwoViews(torch.utils.data.Dataset):
    """A lightly-style data set: ((view1, view2), y), the views made by its own (seeded) transform."""

    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return (self.x[i], -self.x[i]), i % 3


def test_views_from_the_data_set_or_a_user_transform_reach_the_model_as_they_are():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(24, 6, generator=g)
    encoder = torch.nn.Linear(6, 5)
    cfg = TrainConfig(**{**TINY, "lr": 0.0, "weight_decay": 0.0, "css_on": "backbone"})
    by_dataset = Trainer(cfg, TwoViews(x), model=encoder).fit()
    _alternate.calls = 0
    by_transform = Trainer(cfg, TensorDataset(x), model=encoder, transform=_alternate).fit()
    for result in (by_dataset, by_transform):
        with torch.no_grad():  # the backbone's cosines: the head's BatchNorm depends on the batch
            expect = torch.nn.functional.cosine_similarity(encoder(x), encoder(-x))
        torch.testing.assert_close(result.scores(), expect, rtol=1e-5, atol=1e-5)
        assert result.model.encoder is encoder and result.tracker.counts["css"].eq(1).all()
    assert float(expect.std()) > 1e-3
    assert Trainer(cfg, TwoViews(x)).augment is None  # no built-in augmentation on top of the data set's views
    with pytest.raises(ValueError, match=r"transform must be float tensors.*ToTensor\(\).*got list"):
        Trainer(cfg, TensorDataset(x), transform=lambda v: v.tolist())


def _alternate(v):
    """A transform whose two calls per example give (v, -v)."""
    _alternate.calls += 1
    return v if _alternate.calls % 2 else -v


def test_vectors_get_vector_augmentations_that_differ_and_keep_shape():
    aug = Augment.for_data("tensor", (16,))
    x = torch.randn(8, 16)
    a, b = aug(x, torch.Generator().manual_seed(0)), aug(x, torch.Generator().manual_seed(0))
    assert isinstance(aug, VectorAugment) and torch.equal(a, b) and a.shape == x.shape and not torch.equal(a, x)
    s = SignalAugment()(torch.randn(4, 2, 40), torch.Generator().manual_seed(0))
    assert s.shape == (4, 2, 40) and bool(torch.isfinite(s).all())
