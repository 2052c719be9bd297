"""Batched, seeded augmentations on tensors, run on the device the batch lives on.

One call augments a whole batch with per-example random parameters drawn from a
`torch.Generator`, so two runs with the same generator state produce identical views (that is
what makes checkpoint/resume reproducible). `Augment.for_data` picks them by modality from the
canonical example shape (`data.sample_layout`): `Augment` for images (C, H, W), `SignalAugment`
for 1-D signals (C, L), `VectorAugment` for vectors and embeddings (D,).

Example:
    >>> import torch
    >>> from coreset_ext.train.augment import Augment
    >>> aug = Augment.for_data("digits", (1, 8, 8))
    >>> g = torch.Generator().manual_seed(0)
    >>> aug(torch.rand(4, 1, 8, 8), g).shape
    torch.Size([4, 1, 8, 8])
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (hi - lo) + lo


class _Recorded:
    """An augmentation's settings as the run record stores them: its kind and its fields."""

    kind: ClassVar[str]

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self)}


@dataclass
class Augment(_Recorded):
    """SimCLR-style views: random resized crop, flip, colour jitter, blur and noise, per example.

    Args:
        crop_scale: range of the crop's area as a fraction of the image (aspect ratio 3/4..4/3).
        flip: horizontal flip with probability 0.5 (off for digits: a flipped 2 is not a 2).
        color_jitter: strength of brightness/contrast/saturation jitter (0 disables; colour images).
        blur_p: probability of a Gaussian blur (sigma 0.1..1.0, 3x3 kernel).
        noise_std: std of additive Gaussian noise (also the only view change for embeddings).
        feature_drop: for embeddings (N, D): probability of zeroing each feature.
    """

    kind: ClassVar[str] = "image"
    crop_scale: tuple[float, float] = (0.35, 1.0)
    flip: bool = True
    color_jitter: float = 0.4
    blur_p: float = 0.5
    noise_std: float = 0.02
    feature_drop: float = 0.1

    @classmethod
    def for_data(cls, source: str, sample_shape: tuple[int, ...]) -> Augment | SignalAugment | VectorAugment:
        """Defaults by modality (the canonical example shape) and source: no flips for digits,
        jitter only in colour. A shape of no built-in modality is a ValueError saying what to pass."""
        if len(sample_shape) == 1:
            return VectorAugment()
        if len(sample_shape) == 2:
            return SignalAugment()
        if len(sample_shape) != 3 or min(sample_shape[1:]) < 2:
            raise ValueError(f"sample_shape: no built-in augmentation fits examples of shape {tuple(sample_shape)} "
                             "(images (C, H, W) with H, W >= 2, signals (C, L), vectors (D,)); pass your own "
                             "transform= (one view of an example) or augment= ((batch, generator) -> views)")
        colour = sample_shape[0] == 3
        is_digits = source.startswith("digits")
        return cls(
            crop_scale=(0.5, 1.0) if is_digits else (0.2, 1.0),
            flip=not is_digits,
            color_jitter=0.4 if colour else 0.0,
            blur_p=0.3 if is_digits else 0.5,
            noise_std=0.05 if is_digits else 0.02,
        )

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if x.dim() == 2:
            return self._embeddings(x, generator)
        if x.dim() != 4 or min(x.shape[2:]) < 2:
            raise ValueError(f"x must be (N, C, H, W) images with H, W >= 2 or (N, D) embeddings, got shape "
                             f"{tuple(x.shape)}")
        n, c, h, w = x.shape
        dev, g = x.device, generator
        x = self._crop(x, g)
        if self.flip:
            flip = torch.rand(n, generator=g, device=dev) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if self.color_jitter > 0 and c == 3:
            x = self._jitter(x, g)
        if self.blur_p > 0:
            x = self._blur(x, g)
        if self.noise_std > 0:
            x = x + self.noise_std * torch.randn(x.shape, generator=g, device=dev, dtype=x.dtype)
        return x

    def _crop(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        # One affine grid per example: scale to the crop's size, shift to its centre, resample.
        n, dev = x.shape[0], x.device
        area = _uniform(n, *self.crop_scale, g, dev)
        log_r = _uniform(n, -0.2877, 0.2877, g, dev)  # log(3/4) .. log(4/3)
        ratio = log_r.exp()
        sw = (area * ratio).sqrt().clamp(max=1.0)
        sh = (area / ratio).sqrt().clamp(max=1.0)
        cx = (torch.rand(n, generator=g, device=dev) * 2 - 1) * (1 - sw)
        cy = (torch.rand(n, generator=g, device=dev) * 2 - 1) * (1 - sh)
        theta = torch.zeros(n, 2, 3, device=dev, dtype=x.dtype)
        theta[:, 0, 0], theta[:, 0, 2] = sw, cx
        theta[:, 1, 1], theta[:, 1, 2] = sh, cy
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def _jitter(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n, dev, s = x.shape[0], x.device, self.color_jitter
        b = _uniform(n, 1 - s, 1 + s, g, dev)[:, None, None, None]
        c = _uniform(n, 1 - s, 1 + s, g, dev)[:, None, None, None]
        sat = _uniform(n, 1 - s, 1 + s, g, dev)[:, None, None, None]
        x = x * b
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * c + mean
        gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        x = (x - gray) * sat + gray
        return x.clamp(0, 1)

    def _blur(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n, c = x.shape[:2]
        dev = x.device
        sigma = _uniform(n, 0.1, 1.0, g, dev)
        apply = torch.rand(n, generator=g, device=dev) < self.blur_p
        t = torch.tensor([-1.0, 0.0, 1.0], device=dev, dtype=x.dtype)
        k1 = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None].to(x.dtype) ** 2))
        k1 = k1 / k1.sum(dim=1, keepdim=True)  # [n, 3]
        k2 = k1[:, :, None] * k1[:, None, :]  # [n, 3, 3]: a separable Gaussian per example
        weight = k2[:, None].repeat_interleave(c, dim=0).reshape(n * c, 1, 3, 3)
        xp = F.pad(x.reshape(1, n * c, *x.shape[2:]), (1, 1, 1, 1), mode="reflect")
        blurred = F.conv2d(xp, weight, groups=n * c).reshape(x.shape)
        return torch.where(apply[:, None, None, None], blurred, x)

    def _embeddings(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        dev = x.device
        keep = (torch.rand(x.shape, generator=g, device=dev) >= self.feature_drop).to(x.dtype)
        noise = torch.randn(x.shape, generator=g, device=dev, dtype=x.dtype)
        return x * keep + self.noise_std * x.std(dim=0, keepdim=True) * noise


@dataclass
class SignalAugment(_Recorded):
    """Views of 1-D signals (N, C, L), per example: a random crop (and so a shift) resampled to L,
    an amplitude scale, Gaussian noise relative to the example's spread, and a masked span.

    Args:
        crop_scale: range of the crop's length as a fraction of L.
        amplitude: the signal is multiplied by a factor in [1 - amplitude, 1 + amplitude].
        noise_std: std of additive noise, as a fraction of each example's std.
        mask_frac: up to this fraction of L, a random contiguous span, is set to zero.

    Example:
        >>> import torch
        >>> SignalAugment()(torch.randn(4, 1, 40), torch.Generator().manual_seed(0)).shape
        torch.Size([4, 1, 40])
    """

    kind: ClassVar[str] = "signal"
    crop_scale: tuple[float, float] = (0.6, 1.0)
    amplitude: float = 0.2
    noise_std: float = 0.05
    mask_frac: float = 0.15

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"x must be (N, C, L) signals, got shape {tuple(x.shape)}")
        n, _, length = x.shape
        dev, g = x.device, generator
        # crop: one affine grid per example along the length (the height is a dummy of size 1)
        scale = _uniform(n, *self.crop_scale, g, dev)
        centre = (torch.rand(n, generator=g, device=dev) * 2 - 1) * (1 - scale)
        theta = torch.zeros(n, 2, 3, device=dev, dtype=x.dtype)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1] = scale, centre, 1.0
        grid = F.affine_grid(theta, [n, x.shape[1], 1, length], align_corners=False)
        x = F.grid_sample(x[:, :, None], grid, mode="bilinear", padding_mode="border", align_corners=False)[:, :, 0]
        x = x * _uniform(n, 1 - self.amplitude, 1 + self.amplitude, g, dev)[:, None, None].to(x.dtype)
        spread = x.std(dim=(1, 2), keepdim=True) if x[0].numel() > 1 else x.abs().mean(dim=(1, 2), keepdim=True)
        x = x + self.noise_std * spread * torch.randn(x.shape, generator=g, device=dev, dtype=x.dtype)
        span = (_uniform(n, 0, self.mask_frac, g, dev) * length).long()
        start = (torch.rand(n, generator=g, device=dev) * (length - span + 1)).long()
        pos = torch.arange(length, device=dev)
        masked = (pos[None] >= start[:, None]) & (pos[None] < (start + span)[:, None])
        return x.masked_fill(masked[:, None], 0.0)


@dataclass
class VectorAugment(_Recorded):
    """Views of vectors or embeddings (N, D), per example: mixing with another example of the
    batch, feature dropout, and Gaussian noise relative to each feature's spread over the batch.

    Args:
        mix: x is mixed with a random other example: (1 - a) x + a x_other, a in [0, mix].
        feature_drop: probability of zeroing each feature.
        noise_std: std of additive noise, as a fraction of each feature's std over the batch.

    Example:
        >>> import torch
        >>> VectorAugment()(torch.randn(4, 16), torch.Generator().manual_seed(0)).shape
        torch.Size([4, 16])
    """

    kind: ClassVar[str] = "vector"
    mix: float = 0.2
    feature_drop: float = 0.2
    noise_std: float = 0.1

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if x.dim() != 2:
            raise ValueError(f"x must be (N, D) vectors, got shape {tuple(x.shape)}")
        n, dev, g = x.shape[0], x.device, generator
        other = torch.randperm(n, generator=g, device=dev)
        a = _uniform(n, 0, self.mix, g, dev)[:, None].to(x.dtype)
        x = (1 - a) * x + a * x[other]
        keep = (torch.rand(x.shape, generator=g, device=dev) >= self.feature_drop).to(x.dtype)
        spread = x.std(dim=0, keepdim=True) if n > 1 else x.abs()
        noise = torch.randn(x.shape, generator=g, device=dev, dtype=x.dtype)
        return x * keep + self.noise_std * spread * noise
