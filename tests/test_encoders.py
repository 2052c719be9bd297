"""Any model: torchvision's ResNet-18 with the CIFAR stem, torchvision:<name>, timm:<name> when timm
is installed, a user's nn.Module (width by a dry forward), local pretrained weights."""

import pytest
import torch
from torch.utils.data import TensorDataset

from coreset_ext.train import TrainConfig, Trainer
from coreset_ext.train.models import build_encoder, import_torchvision, output_width
from coreset_ext.train.trainer import export_encoder

TINY = dict(epochs=1, batch_size=8, proj_dim=8, proj_hidden=16, progress=False, device="cpu")


def _images(n=16, c=3, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, c, size, size, generator=g), torch.arange(n) % 2)


def test_builtin_resnet18_is_torchvisions_with_the_cifar_stem():
    tv = import_torchvision()
    enc = build_encoder("resnet18", (3, 16, 16))
    assert isinstance(enc, tv.models.ResNet) and enc.out_dim == 512
    assert enc.conv1.kernel_size == (3, 3) and enc.conv1.stride == (1, 1) and isinstance(enc.maxpool, torch.nn.Identity)
    # the rest is torchvision's resnet18, layer for layer
    ref = tv.models.resnet18(weights=None)
    ours = {k: v.shape for k, v in enc.state_dict().items()}
    theirs = {k: v.shape for k, v in ref.state_dict().items() if not k.startswith(("fc.", "conv1."))}
    assert {k: v for k, v in ours.items() if k != "conv1.weight"} == theirs
    enc.eval()
    assert enc(torch.rand(2, 3, 16, 16)).shape == (2, 512)


@pytest.mark.parametrize("name,channels", [("torchvision:resnet18", 3), ("torchvision:mobilenet_v3_small", 1)])
def test_a_torchvision_model_trains_as_the_encoder(name, channels):
    cfg = TrainConfig(encoder=name, **TINY)
    trainer = Trainer(cfg, _images(c=channels, size=16))
    result = trainer.fit()
    assert bool(torch.isfinite(result.scores()).all())
    width = {"torchvision:resnet18": 512, "torchvision:mobilenet_v3_small": 1024}[name]
    assert trainer.model.encoder.out_dim == width  # the last Linear layer's input, by the dry forward


def test_unknown_library_models_and_a_missing_timm_are_named():
    with pytest.raises(ValueError, match="torchvision has no model 'resnet1000'"):
        build_encoder("torchvision:resnet1000", (3, 8, 8))
    with pytest.raises(ValueError, match=r"takes images, but the examples have shape \(16,\)"):
        build_encoder("torchvision:resnet18", (16,))
    with pytest.raises(ValueError, match="encoder"):
        TrainConfig(encoder="resnet1000")
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="needs timm, which is not installed"):
            build_encoder("timm:resnet18", (3, 8, 8))


def test_timm_models_when_timm_is_installed():
    import_torchvision()  # timm imports torchvision: with the fallback when its compiled ops cannot load
    pytest.importorskip("timm")
    enc = build_encoder("timm:resnet18", (1, 16, 16))
    assert enc(torch.rand(2, 1, 16, 16)).shape == (2, enc.out_dim)


def test_a_users_module_gets_its_width_from_a_dry_forward_and_bad_outputs_are_named():
    encoder = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())
    trainer = Trainer(TrainConfig(**TINY), _images(), model=encoder)
    assert trainer.model.encoder.out_dim == 20 and trainer.model.head.net[0].in_features == 20
    assert trainer.run_record()["model"] == "Sequential"
    with pytest.raises(ValueError, match=r"model: the encoder must return \[batch, features\].*shape \(2, 5, 6, 6\)"):
        Trainer(TrainConfig(**TINY), _images(), model=torch.nn.Conv2d(3, 5, 3))
    with pytest.raises(ValueError, match=r"model: cannot encode examples of shape \(3, 8, 8\)"):
        Trainer(TrainConfig(**TINY), _images(), model=torch.nn.Linear(7, 2))
    with pytest.raises(ValueError, match="the encoder must return"):
        output_width(torch.nn.Identity(), torch.zeros(2, 3, 4, 4))


def test_pretrained_weights_load_from_safetensors_and_torch_files(tmp_path):
    torch.manual_seed(0)
    enc = build_encoder("small_cnn", (1, 8, 8), width=4)
    export_encoder(enc, tmp_path / "enc.safetensors")
    torch.manual_seed(1)
    loaded = build_encoder("small_cnn", (1, 8, 8), width=4, pretrained=tmp_path / "enc.safetensors")
    for (k, v), w in zip(enc.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(v, w), k
    # a torchvision checkpoint holds its classifier (fc.*): the encoder, which has none, skips it
    tv = import_torchvision()
    full = tv.models.resnet18(weights=None)
    torch.save(full.state_dict(), tmp_path / "r18.pth")
    enc = build_encoder("torchvision:resnet18", (3, 32, 32), pretrained=tmp_path / "r18.pth")
    assert torch.equal(enc.layer4[1].bn2.weight, full.layer4[1].bn2.weight)
    with pytest.raises(ValueError, match=r"pretrained: .*r18.pth does not fit the encoder"):
        build_encoder("small_cnn", (3, 8, 8), pretrained=tmp_path / "r18.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"bad.safetensors cannot be read as safetensors"):
        build_encoder("small_cnn", (1, 8, 8), pretrained=tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="pretrained: .*nope.pt is not a file"):
        build_encoder("small_cnn", (1, 8, 8), pretrained=tmp_path / "nope.pt")
