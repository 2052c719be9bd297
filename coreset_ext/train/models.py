"""Encoders and the projection head: a small CNN for tiny images (and its 1-D twin for signals),
torchvision's ResNet-18 with the CIFAR stem, an MLP for vectors and precomputed embeddings, any
torchvision model (`torchvision:<name>`), any timm model when timm is installed (`timm:<name>`),
and any `nn.Module` a user passes (`as_encoder` infers its output width).

Example:
    >>> import torch
    >>> from coreset_ext.train.models import build_encoder, ProjectionHead
    >>> enc = build_encoder("small_cnn", (1, 8, 8))
    >>> enc(torch.rand(2, 1, 8, 8)).shape == (2, enc.out_dim)
    True
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from coreset_ext._validation import Options, check


@contextlib.contextmanager
def evaluating_on(model: nn.Module, device: torch.device | str) -> Iterator[nn.Module]:
    """`model` in eval mode on `device` for the block; afterwards its mode and device are restored,
    so a caller's model (and its optimiser's state) stays where it was."""
    home = next(model.parameters(), torch.empty(0)).device
    was_training = model.training
    model.to(device).eval()
    try:
        yield model
    finally:
        model.train(was_training)
        model.to(home)

logger = logging.getLogger(__name__)

ENCODERS = Options("auto", "small_cnn", "resnet18", "mlp")
PREFIXES = ("torchvision:", "timm:")  # encoder names taken from those libraries


def _norm(c: int, norm: bool) -> nn.Module:
    return nn.BatchNorm2d(c) if norm else nn.Identity()


class SmallCNN(nn.Module):
    """Four 3x3 conv layers (two stages) and global average pooling: enough for 8x8 .. 32x32 images."""

    def __init__(self, in_channels: int = 1, width: int = 32, norm: bool = True) -> None:
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1, bias=not norm), _norm(w, norm), nn.ReLU(inplace=True),
            nn.Conv2d(w, w, 3, padding=1, bias=not norm), _norm(w, norm), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=not norm), _norm(2 * w, norm), nn.ReLU(inplace=True),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=not norm), _norm(2 * w, norm), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.out_dim = 2 * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN1d(nn.Module):
    """SmallCNN for 1-D signals (N, C, L): four size-3 conv layers (two stages), global average pooling."""

    def __init__(self, in_channels: int = 1, width: int = 32, norm: bool = True) -> None:
        super().__init__()
        w = width

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv1d(cin, cout, 3, padding=1, bias=not norm), nn.BatchNorm1d(cout) if norm else nn.Identity(),
                    nn.ReLU(inplace=True)]

        self.net = nn.Sequential(*block(in_channels, w), *block(w, w), nn.MaxPool1d(2, ceil_mode=True),
                                 *block(w, 2 * w), *block(2 * w, 2 * w), nn.AdaptiveAvgPool1d(1), nn.Flatten())
        self.out_dim = 2 * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def import_torchvision():
    """torchvision, imported. A CUDA build of torchvision beside a CPU torch cannot load its compiled
    ops (detection's nms & co.), and its import then fails registering them; its models are plain
    Python and need none, so the two schemas it registers are declared (with no kernel) and the
    import retried. Calling nms would then fail; this package never does."""
    try:
        import torchvision
    except ImportError:
        raise ValueError("encoder: resnet18, torchvision:<name> and timm:<name> need torchvision, which is not "
                         "installed (pip install --no-deps torchvision, the release matching your torch)") from None
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        import sys

        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        lib = torch.library.Library("torchvision", "FRAGMENT")  # noqa: TOR901 -- kept alive below
        for op in ("nms", "qnms"):
            try:
                lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            except RuntimeError:  # already declared
                pass
        import_torchvision._lib = lib
        import torchvision
        logger.warning("torchvision %s cannot load its compiled ops with this torch %s; its models work, its "
                       "detection ops (nms, roi_align) do not", torchvision.__version__, torch.__version__)
    return torchvision


def resnet18_cifar(in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-18 adapted to small images as SimCLR does for CIFAR: a 3x3 stride-1
    stem, no max-pool, no classifier: 512-d features."""
    tv = import_torchvision()
    net = tv.models.resnet18(weights=None)
    net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's conv init
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    net.out_dim = 512
    return net


class ProjectionHead(nn.Module):
    """SimCLR's MLP head: Linear -> BN -> ReLU -> Linear."""

    def __init__(self, in_dim: int, hidden: int = 128, out_dim: int = 64, norm: bool = True) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden) if norm else nn.Identity(),
                                 nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))
        self.out_dim = out_dim

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class MLPEncoder(ProjectionHead):
    """For precomputed embeddings (N, D): Linear -> BN -> ReLU -> Linear, a projection head's shape."""

    def __init__(self, in_dim: int, hidden: int = 256, out_dim: int = 128) -> None:
        super().__init__(in_dim, hidden, out_dim)


class ContrastiveModel(nn.Module):
    """Encoder f and head g; `forward` returns (h = f(x), p = g(h)), p unnormalised."""

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return h, self.head(h)


def _strip_classifier(net: nn.Module) -> list[str]:
    """Replaces a classifier model's last Linear layer (`fc`, `head`, `heads`, `classifier`) by the
    identity, so it returns features; returns the state-dict prefixes of what was removed."""
    for attr in ("fc", "head", "heads", "classifier"):
        part = getattr(net, attr, None)
        if isinstance(part, nn.Linear):
            setattr(net, attr, nn.Identity())
            return [f"{attr}."]
        if isinstance(part, nn.Sequential) and len(part) and isinstance(part[-1], nn.Linear):
            part[-1] = nn.Identity()
            return [f"{attr}.{len(part) - 1}."]
    return []


class ChannelAdapter(nn.Module):
    """Feeds `in_channels` channels to an encoder made for three: grey repeated, others through a 1x1 conv."""

    def __init__(self, in_channels: int, encoder: nn.Module) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.project = nn.Identity() if in_channels == 1 else nn.Conv2d(in_channels, 3, 1)
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.expand(-1, 3, -1, -1) if self.in_channels == 1 else self.project(x)
        return self.encoder(x)


def _library_encoder(name: str, sample_shape: tuple[int, ...]) -> tuple[nn.Module, list[str]]:
    lib, _, model = name.partition(":")
    if len(sample_shape) != 3:
        raise ValueError(f"encoder: {name!r} takes images, but the examples have shape {sample_shape}; use 'auto'")
    c = sample_shape[0]
    if lib == "timm":
        try:
            import_torchvision()  # timm imports it: the same fallback as above when its ops cannot load
            import timm
        except ImportError:
            raise ValueError(f"encoder: {name!r} needs timm, which is not installed (pip install timm)") from None
        try:  # timm adapts the stem to c channels and drops the classifier itself
            return timm.create_model(model, pretrained=False, num_classes=0, in_chans=c), []
        except RuntimeError as e:
            raise ValueError(f"encoder: timm has no model {model!r} ({e})") from None
    tv = import_torchvision()
    if model not in tv.models.list_models():
        raise ValueError(f"encoder: torchvision has no model {model!r}; torchvision.models.list_models() lists them "
                         f"({', '.join(tv.models.list_models()[:8])}, ...)")
    net = tv.models.get_model(model, weights=None)
    removed = _strip_classifier(net)
    return (net if c == 3 else ChannelAdapter(c, net)), removed


def load_weights(encoder: nn.Module, path: str | Path, ignore: list[str] = ()) -> None:
    """Loads a local state dict (.pt/.pth with weights_only, or .safetensors) into `encoder`; keys
    under `ignore` (a classifier that was removed) are skipped. Any other mismatch is a ValueError
    naming the file and the keys."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"pretrained: {path} is not a file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as e:  # noqa: BLE001 -- safetensors raises its own types for a bad file
            raise ValueError(f"pretrained: {path} cannot be read as safetensors ({type(e).__name__}: {e})") from None
    else:
        from coreset_ext.train.data import read_pt

        state = read_pt(path)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"pretrained: {path} must hold a state dict, got {type(state).__name__}")
    target = encoder.encoder if isinstance(encoder, ChannelAdapter) else encoder
    state = {k: v for k, v in state.items() if not any(k.startswith(p) for p in ignore)}
    try:
        missing, unexpected = target.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"pretrained: {path} does not fit the encoder: {e}") from None
    if missing or unexpected:
        raise ValueError(f"pretrained: {path} does not fit the encoder: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")


@torch.no_grad()
def output_width(encoder: nn.Module, sample: torch.Tensor, name: str = "model") -> int:
    """The width D of `encoder`'s output [N, D] on a batch of two examples `sample`, found by one dry
    forward in eval mode (its mode is restored); any other output is a ValueError naming `name`."""
    was_training = encoder.training
    encoder.eval()
    try:
        out = encoder(sample)
    except Exception as e:  # noqa: BLE001 -- the network's own error, for examples it cannot take
        raise ValueError(f"{name}: cannot encode examples of shape {tuple(sample.shape[1:])} ({type(e).__name__}: "
                         f"{e}); pass a transform= that fits them to the encoder, or another encoder") from None
    finally:
        encoder.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != sample.shape[0]:
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{name}: the encoder must return [batch, features] for a batch of "
                         f"{sample.shape[0]}, got {got}")
    return int(out.shape[1])


def build_encoder(name: str, sample_shape: tuple[int, ...], *, width: int = 32, norm: bool = True,
                  pretrained: str | Path | None = None) -> nn.Module:
    """`name` in ENCODERS, `torchvision:<name>` or `timm:<name>`; `sample_shape` is one example's
    canonical shape ((C, H, W), (C, L) or (D,)). "auto" is small_cnn for images and signals and mlp
    for vectors. `pretrained` loads a local state dict (nothing is downloaded). The encoder has
    `out_dim`, its output width."""
    check("encoder", name, str)
    sample_shape = tuple(sample_shape)
    removed: list[str] = []
    if name.startswith(PREFIXES):
        enc, removed = _library_encoder(name, sample_shape)
    else:
        check("encoder", name, ENCODERS)
        if name == "auto":
            name = "mlp" if len(sample_shape) == 1 else "small_cnn"
        if len(sample_shape) == 1:
            if name != "mlp":
                raise ValueError(f"encoder: {name!r} needs images, but the data are embeddings of shape "
                                 f"{sample_shape}; use 'mlp' or 'auto'")
            enc = MLPEncoder(sample_shape[0])
        elif name == "mlp":
            raise ValueError(f"encoder: 'mlp' needs embeddings, but the data are images or signals of shape "
                             f"{sample_shape}; use 'auto'")
        elif len(sample_shape) == 2:
            if name != "small_cnn":
                raise ValueError(f"encoder: {name!r} takes images, but the data are 1-D signals of shape "
                                 f"{sample_shape}; use 'small_cnn' or 'auto'")
            enc = SmallCNN1d(sample_shape[0], width=width, norm=norm)
        elif name == "resnet18":
            enc = resnet18_cifar(sample_shape[0])
        else:
            enc = SmallCNN(sample_shape[0], width=width, norm=norm)
    if pretrained is not None:
        load_weights(enc, pretrained, removed)
    if not hasattr(enc, "out_dim"):
        enc.out_dim = output_width(enc, torch.zeros(2, *sample_shape), f"encoder {name!r}")
    return enc


def as_encoder(module: nn.Module, sample: torch.Tensor) -> nn.Module:
    """A user's encoder with `out_dim` set: inferred by a dry forward on `sample` (a batch of two
    examples as the encoder will see them) when it has none."""
    if not isinstance(module, nn.Module):
        raise ValueError(f"model: expected an nn.Module encoder, got {type(module).__name__}")
    if not isinstance(getattr(module, "out_dim", None), int):
        module.out_dim = output_width(module, sample, "model")
    return module


def build_model(encoder: str | nn.Module, sample_shape: tuple[int, ...], *, proj_dim: int = 64,
                proj_hidden: int = 128, width: int = 32, norm: bool = True,
                pretrained: str | Path | None = None) -> ContrastiveModel:
    """An encoder (a name for `build_encoder`, or any nn.Module, `as_encoder` with a dry forward on
    zeros of `sample_shape`) with a projection head."""
    if isinstance(encoder, ContrastiveModel):
        return encoder
    if isinstance(encoder, nn.Module):
        enc = as_encoder(encoder, torch.zeros(2, *sample_shape))
    else:
        enc = build_encoder(encoder, sample_shape, width=width, norm=norm, pretrained=pretrained)
    return ContrastiveModel(enc, ProjectionHead(enc.out_dim, proj_hidden, proj_dim, norm=norm))
