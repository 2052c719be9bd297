"""Encoders and the projection head: a small CNN for tiny images, ResNet-18 with the CIFAR stem,
an MLP for precomputed embeddings.

Example:
    >>> import torch
    >>> from coreset_ext.train.models import build_encoder, ProjectionHead
    >>> enc = build_encoder("small_cnn", (1, 8, 8))
    >>> enc(torch.rand(2, 1, 8, 8)).shape == (2, enc.out_dim)
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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

ENCODERS = Options("small_cnn", "resnet18", "mlp")


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


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.short(x))


class ResNet18(nn.Module):
    """ResNet-18 with the CIFAR stem (3x3 conv, stride 1, no max-pool), 512-d features."""

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(inplace=True))
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.layers(self.stem(x)))


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


def build_encoder(name: str, sample_shape: tuple[int, ...], *, width: int = 32, norm: bool = True) -> nn.Module:
    """`name` in ENCODERS; `sample_shape` is one example's shape ((C, H, W) or (D,))."""
    check("encoder", name, ENCODERS)
    if len(sample_shape) == 1:
        if name != "mlp":
            raise ValueError(f"encoder: {name!r} needs images, but the data are embeddings of shape {sample_shape}; use 'mlp'")
        return MLPEncoder(sample_shape[0])
    if name == "mlp":
        raise ValueError(f"encoder: 'mlp' needs embeddings, but the data are images of shape {sample_shape}")
    if name == "resnet18":
        return ResNet18(sample_shape[0])
    return SmallCNN(sample_shape[0], width=width, norm=norm)


def build_model(encoder: str, sample_shape: tuple[int, ...], *, proj_dim: int = 64, proj_hidden: int = 128,
                width: int = 32, norm: bool = True) -> ContrastiveModel:
    enc = build_encoder(encoder, sample_shape, width=width, norm=norm)
    return ContrastiveModel(enc, ProjectionHead(enc.out_dim, proj_hidden, proj_dim, norm=norm))
