"""Trainer, data, augmentations: CSS scores are the positive cosines; resume reproduces the scores."""

import pickle

import numpy as np
import pytest
import torch

from coreset_ext.train import Augment, TrainConfig, Trainer, load_dataset
from coreset_ext.train.data import ArrayDataset
from coreset_ext.train.models import build_model
from coreset_ext.train.trainer import read_checkpoint, write_checkpoint


def small_digits(n=48):
    full = load_dataset("digits")
    return ArrayDataset(full.data[:n].clone(), full.labels[:n].clone(), name="digits/slice", num_classes=10)


def test_digits_yields_index_image_label_with_a_fixed_split():
    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    assert len(train) + len(test) == 1797 and len(test) == 359
    i, x, y = train[5]
    assert i == 5 and x.shape == (1, 8, 8) and 0 <= y < 10 and float(x.max()) <= 1.0
    assert train.fingerprint == load_dataset("digits").fingerprint != test.fingerprint
    assert torch.equal(train.data, load_dataset("digits").data)


def test_cifar_directory_is_parsed(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    expect = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, 3).tolist()
        expect.append((data, labels))
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
    train = load_dataset("cifar10", split="train", data_dir=tmp_path)
    test = load_dataset("cifar10", split="test", data_dir=tmp_path)
    assert len(train) == 15 and len(test) == 3 and train.sample_shape == (3, 32, 32)
    assert torch.equal(train.data[3].reshape(-1), torch.from_numpy(expect[1][0][0]))
    assert train.labels.tolist() == sum((e[1] for e in expect[:5]), [])
    i, x, y = test[2]
    assert torch.allclose(x, torch.from_numpy(expect[5][0][2]).float().reshape(3, 32, 32) / 255)


def test_tensor_file_and_missing_dir(tmp_path):
    emb = np.random.default_rng(1).standard_normal((20, 5)).astype(np.float32)
    np.savez(tmp_path / "e.npz", embeddings=emb, labels=np.arange(20) % 3)
    ds = load_dataset("tensor", data_dir=tmp_path / "e.npz")
    assert ds.kind == "embeddings" and len(ds) == 20 and ds.labels.tolist()[:4] == [0, 1, 2, 0]
    with pytest.raises(ValueError, match="does not exist"):
        load_dataset("cifar10", data_dir=tmp_path / "nope")
    with pytest.raises(ValueError, match="cifar10 files"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_augment_is_seeded_and_keeps_shape():
    aug = Augment.for_data("cifar10", (3, 16, 16))
    x = torch.rand(6, 3, 16, 16)
    a = aug(x, torch.Generator().manual_seed(3))
    b = aug(x, torch.Generator().manual_seed(3))
    c = aug(x, torch.Generator().manual_seed(4))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert not Augment.for_data("digits", (1, 8, 8)).flip


def _fixed_views(x, generator):
    # A deterministic "augmentation" that still differs between the two calls of a step: the
    # trainer calls it twice per batch, so alternate between two fixed transforms.
    _fixed_views.calls += 1
    return x if _fixed_views.calls % 2 else (1 - x.flip(-2))


@pytest.mark.parametrize("method", ["simclr", "moco"])
@pytest.mark.parametrize("css_on", ["projection", "backbone"])
def test_css_scores_equal_independently_recomputed_cosines(method, css_on):
    ds = small_digits(40)
    torch.manual_seed(0)
    model = build_model("small_cnn", ds.sample_shape, width=8, proj_dim=16, norm=False)
    # Wide random weights, so the fixed model's cosines differ clearly between examples (default
    # init gives ~1 everywhere, which would make the comparison below weak).
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    cfg = TrainConfig(method=method, epochs=2, batch_size=16, lr=0.0, weight_decay=0.0, css_on=css_on,
                      queue_size=32, progress=False, width=8, proj_dim=16, device="cpu")
    _fixed_views.calls = 0
    result = Trainer(cfg, ds, augment=_fixed_views, model=model).fit()
    # Independent recomputation in float64 from the (unchanged, lr = 0) model and the same views.
    ref = model.double().eval()
    x = ds.data.double()
    with torch.no_grad():
        h1, p1 = ref(x)
        h2, p2 = ref(1 - x.flip(-2))
    a, b = (p1, p2) if css_on == "projection" else (h1, h2)
    expect = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    assert torch.equal(result.tracker.counts["css"], torch.full((40,), 2.0))
    torch.testing.assert_close(result.scores().double(), expect, rtol=1e-5, atol=1e-5)
    assert float(expect.std()) > 1e-3  # the cosines differ between examples: the check can fail


@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_interrupted_and_resumed_run_ends_with_the_same_scores(tmp_path, method):
    ds = small_digits(48)
    # the CPU: bit-identical (cuDNN's convolution algorithms are not, by default)
    cfg = dict(method=method, epochs=3, batch_size=16, queue_size=32, width=8, proj_dim=16, progress=False,
               device="cpu")
    full = Trainer(TrainConfig(**cfg), ds, tmp_path / "full").fit()
    Trainer(TrainConfig(**cfg), ds, tmp_path / "cut").fit(stop_after_epochs=1)  # "interrupted" after epoch 1
    resumed_trainer = Trainer(TrainConfig(**cfg), ds, tmp_path / "cut")
    resumed = resumed_trainer.fit()
    assert resumed_trainer.epoch == 3
    assert torch.equal(full.tracker.sums["css"], resumed.tracker.sums["css"])
    assert torch.equal(full.tracker.counts["css"], resumed.tracker.counts["css"])
    for (k, v), (_, w) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(v, w), k
    assert (tmp_path / "cut" / "scores.npz").is_file() and (tmp_path / "cut" / "checkpoints" / "last.pt").is_file()


def test_resume_on_another_kind_of_device_warns_and_continues(tmp_path):
    """A checkpoint whose augmentation generator lived on another device type (a CUDA generator's
    state is 16 bytes, a CPU one's 5,056): the run continues from it with a fresh stream."""
    ds = small_digits(32)
    cfg = dict(epochs=2, batch_size=16, width=8, proj_dim=16, progress=False, device="cpu")
    Trainer(TrainConfig(**cfg), ds, tmp_path).fit(stop_after_epochs=1)
    path = tmp_path / "checkpoints" / "last.pt"
    state = read_checkpoint(path)
    state["aug_rng"], state["aug_rng_device"] = torch.zeros(16, dtype=torch.uint8), "cuda"
    write_checkpoint(path, state)  # with a valid checksum: an edit torch.save alone makes is refused
    trainer = Trainer(TrainConfig(**cfg), ds, tmp_path)
    with pytest.warns(UserWarning, match="written by a run on cuda"):
        result = trainer.fit()
    assert trainer.epoch == 2 and bool(torch.isfinite(result.scores()).all())
    config = __import__("json").loads((tmp_path / "config.json").read_text())
    assert config["resolved"] == {"device": "cpu", "amp": "off"}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_css_scores_on_the_gpu(method):
    """The trainer on CUDA (fused losses, ScoreTracker on the device): the CSS scores are the
    positive cosines of the fixed model, recomputed in float64 on the CPU (TF32 convolutions)."""
    ds = small_digits(40)
    torch.manual_seed(0)
    model = build_model("small_cnn", ds.sample_shape, width=8, proj_dim=16, norm=False)
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    ref = __import__("copy").deepcopy(model).double().eval()
    cfg = TrainConfig(method=method, epochs=2, batch_size=16, lr=0.0, weight_decay=0.0, queue_size=32,
                      progress=False, width=8, proj_dim=16, device="cuda", amp=False)
    _fixed_views.calls = 0
    result = Trainer(cfg, ds, augment=_fixed_views, model=model).fit()
    x = ds.data.double()
    with torch.no_grad():
        a, b = ref(x)[1], ref(1 - x.flip(-2))[1]
    expect = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    torch.testing.assert_close(result.scores().cpu().double(), expect, rtol=5e-3, atol=5e-3)


def test_resume_on_a_data_set_of_another_size_names_both(tmp_path):
    cfg = dict(epochs=1, batch_size=16, width=8, proj_dim=16, progress=False)
    Trainer(TrainConfig(**cfg), small_digits(32), tmp_path).fit()
    with pytest.raises(ValueError, match="32 examples.*40"):
        Trainer(TrainConfig(**cfg), small_digits(40), tmp_path).fit()


def test_seeded_runs_are_reproducible_and_bad_config_is_rejected():
    ds = small_digits(32)
    cfg = dict(epochs=1, batch_size=16, width=8, proj_dim=16, progress=False, device="cpu")
    a = Trainer(TrainConfig(**cfg), ds).fit().scores()
    b = Trainer(TrainConfig(**cfg), ds).fit().scores()
    assert torch.equal(a, b) and bool(torch.isfinite(a).all())
    with pytest.raises(ValueError, match="method"):
        TrainConfig(method="byol")
    with pytest.raises(ValueError, match="css_on"):
        TrainConfig(css_on="logits")


def test_image_folder_with_class_subdirectories(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(2)
    for cls, count in (("cat", 2), ("dog", 3)):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(tmp_path / "train" / cls / f"{i}.png")
    ds = load_dataset("folder", data_dir=tmp_path, image_size=8)
    assert len(ds) == 5 and ds.sample_shape == (3, 8, 8) and ds.labels.tolist() == [0, 0, 1, 1, 1]
    assert ds.num_classes == 2 and ds.data.dtype == torch.uint8


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_embedding_helpers_leave_the_model_where_it_was():
    from coreset_ext.train.embed import proxy_embeddings
    from coreset_ext.train.evaluate import extract_features

    ds = small_digits(20)
    model = build_model("small_cnn", ds.sample_shape, width=8, proj_dim=16).cuda()
    proxy_embeddings(model, ds, device="cpu")
    extract_features(model.encoder, ds, device="cpu")
    assert all(p.is_cuda for p in model.parameters())
