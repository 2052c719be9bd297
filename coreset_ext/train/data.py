"""Data sets for the trainer: every example comes with its data set index.

All loaders return an `ArrayDataset`: the whole split held in memory as one tensor (uint8 images,
or float images/embeddings) plus labels (-1 where unknown). Small pools such as CIFAR fit easily,
and holding them as one tensor lets the trainer gather a batch and augment it on the device
without a DataLoader. `dataset[i]` returns `(i, x_i, y_i)`, so scores land on the right example.

Sources:
- "digits": scikit-learn's handwritten digits (1,797 real 8x8 images shipped inside scikit-learn,
  so everything runs offline), split 80/20 by a fixed permutation (seed 0).
- "cifar10" / "cifar100": a directory in torchvision's python-pickle format
  (`cifar-10-batches-py/data_batch_1..5, test_batch` or `cifar-100-python/train, test`).
- "folder": an image folder, one sub-directory per class (needs Pillow).
- "tensor": a `.pt` or `.npz` file with `images` (N, C, H, W) or `embeddings` (N, D), and
  optionally `labels` (N,); `.npz` is read without pickle, `.pt` with `weights_only=True`.

Example:
    >>> from coreset_ext.train.data import load_dataset
    >>> train = load_dataset("digits", split="train")
    >>> index, x, y = train[0]
    >>> x.shape, len(train)
    (torch.Size([1, 8, 8]), 1438)
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from coreset_ext._validation import Options, check

SOURCES = Options("digits", "cifar10", "cifar100", "folder", "tensor")
SPLITS = Options("train", "test")
_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ArrayDataset(torch.utils.data.Dataset):
    """An in-memory data set of images (N, C, H, W) or embeddings (N, D) with labels (N,).

    Args:
        data: uint8 images (scaled to [0, 1] on access) or float images/embeddings.
        labels: int64 labels, -1 where unknown; None means all unknown.
        name: where the data came from (recorded in configs and selections).
        num_classes: number of classes (None: inferred from the labels).
    """

    def __init__(self, data: torch.Tensor, labels: torch.Tensor | None = None, *, name: str = "tensor",
                 num_classes: int | None = None) -> None:
        if data.dim() not in (2, 4):
            raise ValueError(f"data must be (N, C, H, W) images or (N, D) embeddings, got shape {tuple(data.shape)}")
        if labels is None:
            labels = torch.full((data.shape[0],), -1, dtype=torch.long)
        labels = torch.as_tensor(labels).long().reshape(-1)
        if labels.shape[0] != data.shape[0]:
            raise ValueError(f"labels has {labels.shape[0]} entries but data has {data.shape[0]} examples")
        self.data = data
        self.labels = labels
        self.name = name
        known = labels[labels >= 0]
        self.num_classes = num_classes if num_classes is not None else (int(known.max()) + 1 if known.numel() else 0)
        self._fingerprint: str | None = None

    @property
    def kind(self) -> str:
        """"images" or "embeddings"."""
        return "images" if self.data.dim() == 4 else "embeddings"

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[1:])

    @property
    def has_labels(self) -> bool:
        return bool((self.labels >= 0).any())

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, int]:
        return int(i), self._as_float(self.data[i]), int(self.labels[i])

    def _as_float(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()

    def batch(self, index: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """The float examples at `index`, moved to `device` (uint8 moves first: 4x less traffic)."""
        x = self.data[index.cpu()].to(device, non_blocking=True)
        return self._as_float(x)

    @property
    def fingerprint(self) -> str:
        """sha256 over the size, shape, dtype and a strided sample of up to 256 examples and labels."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.data, self.labels)
        return self._fingerprint


def fingerprint(data: torch.Tensor, labels: torch.Tensor | None = None, samples: int = 256) -> str:
    """Identifies a data set cheaply: its size, shape and dtype, and a strided sample of its contents."""
    n = data.shape[0]
    h = hashlib.sha256()
    h.update(f"{n}|{tuple(data.shape)}|{data.dtype}".encode())
    idx = torch.linspace(0, n - 1, steps=min(samples, n)).long()
    h.update(np.ascontiguousarray(data[idx].cpu().numpy()).tobytes())
    if labels is not None:
        h.update(np.ascontiguousarray(labels.cpu().numpy().astype(np.int64)).tobytes())
    return h.hexdigest()[:16]


def load_digits_split(split: str = "train", test_fraction: float = 0.2) -> ArrayDataset:
    """scikit-learn's 8x8 digits as (N, 1, 8, 8) floats in [0, 1]; a fixed permutation splits them."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.from_numpy(np.random.RandomState(0).permutation(len(y)))
    n_test = int(round(test_fraction * len(y)))
    idx = perm[n_test:] if split == "train" else perm[:n_test]
    idx = idx.sort().values  # keep the original order within a split
    return ArrayDataset(x[idx].contiguous(), y[idx].contiguous(), name=f"digits/{split}", num_classes=10)


def _unpickle(path: Path) -> dict:
    # The CIFAR archives are pickled dicts of numpy arrays (that is their published format).
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def load_cifar(root: str | os.PathLike, name: str = "cifar10", split: str = "train") -> ArrayDataset:
    """CIFAR-10/100 from torchvision's python format under `root` (or `root` itself being the batches folder)."""
    root = Path(root)
    sub = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    folder = root / sub if (root / sub).is_dir() else root
    if name == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        label_key, classes = b"labels", 10
    else:
        files = ["train"] if split == "train" else ["test"]
        label_key, classes = b"fine_labels", 100
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise ValueError(f"data_dir: {folder} has no {name} files {missing} (expected torchvision's python format)")
    xs, ys = [], []
    for f in files:
        d = _unpickle(folder / f)
        xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[label_key], dtype=np.int64))
    return ArrayDataset(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)),
                        name=f"{name}/{split}", num_classes=classes)


def load_image_folder(root: str | os.PathLike, image_size: int = 32) -> ArrayDataset:
    """An image folder (one sub-directory per class, or images directly in `root`), resized to a square."""
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the 'folder' data source needs Pillow: pip install pillow") from e
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    items: list[tuple[Path, int]] = []
    if classes:
        for c, cls in enumerate(classes):
            items += [(p, c) for p in sorted((root / cls).rglob("*")) if p.suffix.lower() in _IMAGE_EXTS]
    else:
        items = [(p, -1) for p in sorted(root.iterdir()) if p.suffix.lower() in _IMAGE_EXTS]
    if not items:
        raise ValueError(f"data_dir: {root} holds no images ({', '.join(_IMAGE_EXTS)})")
    arr = np.empty((len(items), 3, image_size, image_size), dtype=np.uint8)
    for i, (p, _) in enumerate(items):
        with Image.open(p) as im:
            im = im.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
            arr[i] = np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
    labels = torch.tensor([c for _, c in items], dtype=torch.long)
    return ArrayDataset(torch.from_numpy(arr), labels, name=f"folder:{root.name}",
                        num_classes=len(classes) or None)


def load_tensor_file(path: str | os.PathLike, split: str = "train") -> ArrayDataset:
    """`.npz` (no pickle) or `.pt` (weights_only) holding `images` or `embeddings`, optional `labels`.

    The test split reads the same keys prefixed with `test_` (`test_images`, `test_labels`).
    """
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            content = {k: torch.from_numpy(f[k]) for k in f.files}
    elif path.suffix in (".pt", ".pth"):
        content = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(content, torch.Tensor):
            content = {"images" if content.dim() == 4 else "embeddings": content}
    else:
        raise ValueError(f"data_dir: {path} must be a .npz or .pt file")
    pre = "test_" if split == "test" else ""
    key = next((pre + k for k in ("images", "embeddings", "x", "data") if pre + k in content), None)
    if key is None:
        raise ValueError(f"data_dir: {path} has none of the keys {pre}images/{pre}embeddings/{pre}x/{pre}data "
                         f"(has {sorted(content)})")
    data = content[key]
    if data.dtype != torch.uint8:
        data = data.float()
    labels = content.get(pre + "labels", content.get(pre + "y"))
    return ArrayDataset(data, labels, name=f"tensor:{path.name}/{split}")


def load_dataset(source: str = "digits", *, split: str = "train", data_dir: str | os.PathLike | None = None,
                 image_size: int = 32) -> ArrayDataset:
    """One entry point for every source (see the module docstring). `split` is "train" or "test".

    For "folder", `<data_dir>/<split>` is used when it exists (else `data_dir` itself); for
    "tensor", the test split reads the `test_`-prefixed keys of the same file.
    """
    check("source", source, SOURCES)
    check("split", split, SPLITS)
    if source == "digits":
        return load_digits_split(split)
    if data_dir is None:
        raise ValueError(f"data_dir: the {source!r} source needs a data directory or file, got None")
    if not Path(data_dir).exists():
        raise ValueError(f"data_dir: {data_dir} does not exist")
    if source in ("cifar10", "cifar100"):
        return load_cifar(data_dir, source, split)
    if source == "folder":
        root = Path(data_dir) / split if (Path(data_dir) / split).is_dir() else Path(data_dir)
        return load_image_folder(root, image_size)
    return load_tensor_file(data_dir, split)
