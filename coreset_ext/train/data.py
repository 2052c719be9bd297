"""Data sets for the trainer: every example comes with its data set index.

All loaders return an `ArrayDataset`: the whole split held in memory as one tensor (uint8 images,
or float images/signals/embeddings) plus labels (-1 where unknown). Small pools such as CIFAR fit
easily, and holding them as one tensor lets the trainer gather a batch and augment it on the
device without a DataLoader. `dataset[i]` returns `(i, x_i, y_i)`, so scores land on the right example.

Any other map-style `torch.utils.data.Dataset` (yielding `x`, `(x, y)`, or `((view1, view2), y)`
as lightly and solo-learn datasets do), or a `DataLoader` over `with_index(dataset)`, is read
through `as_data`, which gives the trainer, the embedding helpers and the evaluators one interface.

Each example's modality is read from its shape (`sample_layout`), and batches reach the
augmentations and the encoders in one canonical layout: images (C, H, W) (stored channels first or
last; integer images, 0..255, scaled to [0, 1]), 1-D signals (C, L) (also (C, 1, L) and (C, L, 1),
e.g. N x 1 x 1 x 40), and vectors (D,) (also (D, 1) and (D, 1, 1)).

Sources:
- "digits": scikit-learn's handwritten digits (1,797 real 8x8 images shipped inside scikit-learn,
  so everything runs offline), split 80/20 by a fixed permutation (seed 0).
- "cifar10" / "cifar100": a directory in torchvision's python-pickle format
  (`cifar-10-batches-py/data_batch_1..5, test_batch` or `cifar-100-python/train, test`).
- "folder": an image folder, one sub-directory per class (needs Pillow).
- "tensor": a `.pt` or `.npz` file with `images` (N, C, H, W), `signals` (N, C, L) or
  `embeddings` (N, D), and optionally `labels` (N,); `.npz` is read without pickle, `.pt` with
  `weights_only=True`.
  Channels-last images (N, H, W, C) are transposed to (N, C, H, W) when only that reading has
  1, 3 or 4 channels (see `load_tensor_file`).

Every loader checks what it reads before use: a file that is unreadable, of the wrong structure,
dtype or shape, with labels that are not one whole number per example, or (CIFAR) that asks the
unpickler for anything but numpy arrays, is a ValueError naming the file and the field.

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from coreset_ext._validation import Options, check
from coreset_ext.io import read_npz, reading

# numpy's own pickle helpers, the only callables a CIFAR batch may name (see _CifarUnpickler)
try:
    from numpy._core.multiarray import _reconstruct
    from numpy._core.numeric import _frombuffer
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct
    from numpy.core.numeric import _frombuffer

SOURCES = Options("digits", "cifar10", "cifar100", "folder", "tensor")
SPLITS = Options("train", "test")
_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_CHANNELS = (1, 3, 4)  # grey, RGB, RGBA: what tells (N, C, H, W) from (N, H, W, C)
_DATA_KEYS = ("images", "embeddings", "signals", "x", "data")
_LABEL_KEYS = ("labels", "y")


def _labels(values, n: int, where: str, *, low: int = -1, high: int | None = None) -> torch.Tensor:
    """Labels as int64 [n], each in [low, high) (-1: unknown). Integer arrays of any dtype, or
    float arrays holding only whole numbers; anything else would be truncated (2.7 -> 2), flattened
    ((N, 1) or (N, 2) -> N or 2N labels) or wrapped (NaN -> int64's minimum) without a word."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        values = (values.float() if values.dtype == torch.bfloat16 else values).numpy()  # numpy has no bf16
    try:
        y = np.asarray(values)
    except ValueError:  # a ragged list
        raise ValueError(f"{where} must be a 1-D array of {n} whole-number labels, got a ragged sequence") from None
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"{where} must be a 1-D array of {n} labels (one per example), got shape {y.shape}")
    if y.dtype.kind not in "iuf":
        raise ValueError(f"{where} must hold whole-number labels (an integer array), got {y.dtype}")
    top = high if high is not None else 2**63  # int64's range: a uint64 or float beyond it would wrap
    bad = ~((y >= low) & (y < top))  # NaN fails this too
    if y.dtype.kind == "f":
        bad |= y != np.floor(y)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        hi = f"{top - 1}" if high is not None else "2**63 - 1"
        unknown = " (-1: unknown)" if low == -1 else ""
        raise ValueError(f"{where} must hold whole numbers in [{low}, {hi}]{unknown}, got {y[i]} at example {i}")
    return torch.from_numpy(y.astype(np.int64))


KINDS = {"image": "images", "signal": "signals", "vector": "embeddings"}  # modality -> ArrayDataset.kind
_HOW = ("pass transform= (a callable making one view of an example; it is called twice per example) and "
        "your own encoder, or reshape the data to (N, C, H, W) images, (N, C, L) signals or (N, D) vectors")


@dataclass(frozen=True)
class Layout:
    """How one stored example reads: its modality ("image", "signal", "vector"), its canonical
    shape ((C, H, W), (C, L) or (D,)), and whether images are stored channels last."""

    modality: str
    shape: tuple[int, ...]
    channels_last: bool = False

    def canonical(self, x: torch.Tensor) -> torch.Tensor:
        """A batch (N, *stored shape) in the canonical layout (N, *shape): a view where possible."""
        if self.channels_last:
            x = x.permute(0, 3, 1, 2)
        return x.reshape(x.shape[0], *self.shape)


def sample_layout(shape: tuple[int, ...], where: str = "data", *, strict: bool = False) -> Layout:
    """The layout of an example of `shape` (without the batch dimension).

    (D,) is a vector; (C, L) a signal ((D, 1) a vector); (A, B, C) is an image when it has two
    spatial sizes >= 2, channels first, or channels last when the last size is 1, 3 or 4 (and,
    where both readings fit, only the last is 1, 3 or 4); otherwise a signal (C, 1, L) or (C, L, 1),
    or a vector (D, 1, 1). `strict` (tensor files) refuses images whose channels cannot be told
    (both readings with 1, 3 or 4 channels, or neither), where a Dataset's are read channels first.
    Any other shape is a ValueError naming it and what to do.

    Example:
        >>> sample_layout((1, 1, 40)), sample_layout((16, 16, 3)).shape
        (Layout(modality='signal', shape=(1, 40), channels_last=False), (3, 16, 16))
    """
    s = tuple(int(v) for v in shape)
    if not s or min(s) < 1:
        raise ValueError(f"{where}: an example must hold at least one value, got shape {s}")
    if len(s) == 1:
        return Layout("vector", s)
    if len(s) == 2:
        return Layout("vector", (s[0],)) if s[1] == 1 else Layout("signal", s)
    if len(s) != 3:
        raise ValueError(f"{where}: examples of shape {s} fit none of the built-in modalities (images (C, H, W) "
                         f"or (H, W, C), 1-D signals (C, L), vectors (D,)); {_HOW}")
    a, b, c = s
    first = b >= 2 and c >= 2
    last = a >= 2 and b >= 2 and c in _CHANNELS
    if not first and not last:  # one spatial size or none: a signal, or a vector
        return Layout("vector", (a,)) if b == c == 1 else Layout("signal", (a, b * c))
    if first and last and (a in _CHANNELS) != (c in _CHANNELS):
        channels_last = c in _CHANNELS
    elif first and last:
        if strict and a in _CHANNELS:
            raise ValueError(f"{where} reads both as (N, C, H, W) images with C={a} and as (N, H, W, C) with C={c}; "
                             f"store them as (N, C, H, W) with C in 1, 3 or 4 and H, W other than 1, 3 and 4 (resize "
                             "them)")
        if strict:
            raise ValueError(f"{where} has neither 1, 3 nor 4 channels, first (N, C, H, W) or last (N, H, W, C); "
                             "store images as (N, C, H, W) with C in 1, 3 or 4, or as (N, D) embeddings")
        channels_last = False
    else:
        channels_last = last
        if strict and not last and a not in _CHANNELS:
            raise ValueError(f"{where} has neither 1, 3 nor 4 channels, first (N, C, H, W) or last (N, H, W, C); "
                             "store images as (N, C, H, W) with C in 1, 3 or 4, or as (N, D) embeddings")
    return Layout("image", (c, a, b) if channels_last else s, channels_last)


def to_float(x: torch.Tensor, modality: str, where: str = "data") -> torch.Tensor:
    """A canonical batch as floats: integer images (0..255) scaled to [0, 1], anything else cast;
    integer images beyond 0..255 are a ValueError naming `where` (scaling them would be a guess)."""
    if x.is_floating_point():
        return x.float()
    if x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"{where} must hold real numbers (integers or floats), got {x.dtype}")
    if modality != "image":
        return x.float()
    if x.dtype != torch.uint8 and x.numel() and (int(x.min()) < 0 or int(x.max()) > 255):
        raise ValueError(f"{where}: integer images must hold values in 0..255 (they are scaled by 1/255), got "
                         f"{int(x.min())}..{int(x.max())}; store other ranges as floats")
    return x.float().div_(255.0)


class ArrayDataset(torch.utils.data.Dataset):
    """An in-memory data set of images (N, C, H, W), 1-D signals (N, C, L) or vectors (N, D) with labels (N,).

    Args:
        data: uint8/integer images (0..255, scaled to [0, 1] on access) or float images, signals
            or embeddings; other layouts of the same modalities (channels-last images, signals
            (N, C, 1, L) and (N, C, L, 1)) are reshaped to these (`sample_layout`).
        labels: int64 labels, -1 where unknown; None means all unknown.
        name: where the data came from (recorded in configs and selections).
        num_classes: number of classes (None: inferred from the labels).
    """

    def __init__(self, data: torch.Tensor, labels: torch.Tensor | None = None, *, name: str = "tensor",
                 num_classes: int | None = None) -> None:
        if not isinstance(data, torch.Tensor) or data.dim() < 2:
            got = f"shape {tuple(data.shape)}" if isinstance(data, torch.Tensor) else type(data).__name__
            raise ValueError(f"data must be (N, C, H, W) images, (N, C, L) signals or (N, D) embeddings, got {got}")
        self.layout = sample_layout(tuple(data.shape[1:]), "data")
        data = self.layout.canonical(data)
        self.layout = Layout(self.layout.modality, self.layout.shape)
        if not data.is_floating_point():
            to_float(data[:0], self.layout.modality)  # bool/complex refused here
            if self.layout.modality == "image" and data.dtype != torch.uint8:
                to_float(data, "image")  # integer images beyond 0..255 are refused here, not mid-run
        if labels is None:
            labels = torch.full((data.shape[0],), -1, dtype=torch.long)
        labels = _labels(labels, data.shape[0], "labels")
        self.data = data
        self.labels = labels
        self.name = name
        known = labels[labels >= 0]
        self.num_classes = num_classes if num_classes is not None else (int(known.max()) + 1 if known.numel() else 0)
        self._fingerprint: str | None = None

    @property
    def kind(self) -> str:
        """"images", "signals" or "embeddings"."""
        return KINDS[self.layout.modality]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[1:])

    @property
    def has_labels(self) -> bool:
        return bool((self.labels >= 0).any())

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, int]:
        return int(i), self._as_float(self.data[i][None])[0], int(self.labels[i])

    def _as_float(self, x: torch.Tensor) -> torch.Tensor:
        return to_float(x, self.layout.modality)

    def batch(self, index: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """The float examples at `index`, moved to `device` (uint8 moves first: 4x less traffic)."""
        x = self.data[index.cpu()].to(device, non_blocking=True)
        return self._as_float(x)

    makes_views = False  # an in-memory data set has no views of its own (the trainer augments its batches)

    def views(self, index: torch.Tensor, device: torch.device | str = "cpu") -> None:
        return None

    def subset(self, index: torch.Tensor) -> ArrayDataset:
        """The examples at `index` as a new data set (same name and classes)."""
        index = torch.as_tensor(index).long().cpu()
        return ArrayDataset(self.data[index], self.labels[index], name=self.name, num_classes=self.num_classes)

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


def _latin1_bytes(text, encoding):
    """What Python 3's pickler writes for bytes under protocol 2: _codecs.encode(text, "latin1").
    Only that codec: others would let a file pick arbitrary codec modules."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}, which no CIFAR batch uses")
    return text.encode("latin1")


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles CIFAR's python batches, admitting only what they contain: dicts, lists, strings,
    numbers, and the numpy calls that rebuild an array. Plain pickle.load calls whatever a file
    names (os.system included): a crafted batch file would run code just by being read."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,   # the published files (numpy 1)
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # re-pickled under numpy 2
        ("numpy.core.numeric", "_frombuffer"): _frombuffer,        # re-pickled with protocol 5
        ("numpy._core.numeric", "_frombuffer"): _frombuffer,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_bytes,                      # bytes, protocol 2 from Python 3
    }

    def find_class(self, module: str, name: str):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused: it names {module}.{name}, which no CIFAR batch does "
                                         f"(unpickling it could run code)") from None


def _unpickle(path: Path) -> dict:
    # The CIFAR archives are pickled dicts of numpy arrays (that is their published format).
    with reading(path, "CIFAR batch"), open(path, "rb") as f:
        d = _CifarUnpickler(f, encoding="bytes").load()
    if not isinstance(d, dict):
        raise ValueError(f"{path} must hold a dict (CIFAR's python format), got {type(d).__name__}")
    return d


def load_cifar(root: str | os.PathLike, name: str = "cifar10", split: str = "train") -> ArrayDataset:
    """CIFAR-10/100 from torchvision's python format under `root` (or `root` itself being the batches folder).

    The batches are unpickled admitting only numpy arrays, lists, strings and numbers; each must
    hold `data`, a uint8 array [N, 3072], and one label in [0, classes) per row."""
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
        path = folder / f
        d = _unpickle(path)
        for key in (b"data", label_key):
            if key not in d:
                raise ValueError(f"{path}: {key.decode()} is missing (it has {sorted(map(repr, d))})")
        x = d[b"data"]
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
            got = f"{x.dtype} array of shape {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
            raise ValueError(f"{path}: data must be a uint8 array [N, 3072] (32x32 RGB rows), got {got}")
        xs.append(x.reshape(-1, 3, 32, 32))
        ys.append(_labels(d[label_key], x.shape[0], f"{path}: {label_key.decode()}", low=0, high=classes))
    return ArrayDataset(torch.from_numpy(np.concatenate(xs)), torch.cat(ys), name=f"{name}/{split}",
                        num_classes=classes)


def load_image_folder(root: str | os.PathLike, image_size: int = 32) -> ArrayDataset:
    """An image folder (one sub-directory per class, or images directly in `root`), resized to a square."""
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the 'folder' data source needs Pillow: pip install pillow") from e
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"data_dir: {root} is not a directory (the 'folder' source reads an image folder)")
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
        # a corrupt or truncated image fails inside Pillow with errors that do not always name it
        with reading(p, "image"), Image.open(p) as im:
            im = im.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
            arr[i] = np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
    labels = torch.tensor([c for _, c in items], dtype=torch.long)
    return ArrayDataset(torch.from_numpy(arr), labels, name=f"folder:{root.name}",
                        num_classes=len(classes) or None)


def read_pt(path: str | os.PathLike):
    """`torch.load(path, weights_only=True)` of a user's file on the CPU: a corrupt file, or one
    that pickles more than tensors and containers, is a ValueError naming it."""
    with reading(path, ".pt file"):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            # torch's message is a page of advice, including to retry with weights_only=False (that
            # is, to run the file's code); keep only its reason, the paragraph after the first
            paragraphs = [p.strip() for p in str(e).split("\n\n") if p.strip()]
            reason = next((p for p in paragraphs[1:] if not p.startswith("Check the documentation")), str(e))
            raise ValueError(f"torch.load with weights_only=True refuses it: {reason}") from None


def _layout(shape: tuple[int, ...], where: str) -> Layout:
    """The strict layout of a tensor file's array of `shape` (N, ...): images whose channels
    cannot be told are refused (see `sample_layout`)."""
    if len(shape) not in (2, 3, 4):
        raise ValueError(f"{where} must be (N, C, H, W) images or (N, D) embeddings, got shape {tuple(shape)} "
                         "((N, C, L) holds 1-D signals)")
    return sample_layout(tuple(shape[1:]), f"{where} of shape {tuple(shape)}", strict=True)


def _sample_shape(shape: tuple[int, ...], where: str) -> tuple[int, ...]:
    """The shape of one example as the loader will hold it (canonical)."""
    return _layout(shape, where).shape


def _array(content: dict, key: str, path: Path) -> np.ndarray:
    value = content[key]
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return (value.float() if value.dtype == torch.bfloat16 else value).numpy()  # numpy has no bf16
    if not isinstance(value, np.ndarray):
        raise ValueError(f"{path}: {key} must be an array, got {type(value).__name__}")
    return value


def _data(x: np.ndarray, where: str) -> torch.Tensor:
    """A tensor file's images (N, C, H, W; channels-last transposed), signals (N, C, L) or
    embeddings (N, D), checked: real numbers, at least one example, finite; uint8 kept (scaled on
    access), the rest float32 (integer images, 0..255, scaled to [0, 1] here)."""
    if x.dtype.kind not in "uif":
        raise ValueError(f"{where} must hold real numbers (uint8 images or floats), got {x.dtype}")
    if 0 in x.shape:
        raise ValueError(f"{where} must hold at least one example of at least one value, got shape {x.shape}")
    if x.ndim == 3 and where.endswith("images"):  # (N, H, W) would read as signals of H channels
        raise ValueError(f"{where} must be (N, C, H, W) images or (N, D) embeddings, got shape {x.shape}; store "
                         "grey images as (N, 1, H, W), and 1-D signals (N, C, L) under the key 'signals'")
    layout = _layout(x.shape, where)
    t = layout.canonical(torch.from_numpy(x)).contiguous()
    if x.dtype == np.uint8:
        return t
    if x.dtype.kind in "iu":
        return to_float(t, layout.modality, where) if layout.modality == "image" else t.float()
    with np.errstate(over="ignore"):  # checked on the next line
        x = layout.canonical(torch.from_numpy(x.astype(np.float32))).contiguous()
    if not bool(torch.isfinite(x).all()):  # NaN images train to NaN losses; float64 beyond 3e38 overflows here
        raise ValueError(f"{where} holds NaN or Inf values (or values beyond float32's range)")
    return x


def load_tensor_file(path: str | os.PathLike, split: str = "train") -> ArrayDataset:
    """`.npz` (no pickle) or `.pt` (weights_only) holding `images` or `embeddings`, optional `labels`.

    The test split reads the same keys prefixed with `test_` (`test_images`, `test_labels`), and
    its examples must have the train split's shape. Images are (N, C, H, W); images stored
    channels-last, (N, H, W, C), are transposed when only that reading has 1, 3 or 4 channels
    ((N, 32, 32, 3) is read as (N, 3, 32, 32)); a shape that reads both ways ((N, 3, 4, 4)) or
    neither ((N, 5, 32, 32)) is an error saying how to store it. 1-D signals are (N, C, L) under
    `signals`, `x` or `data`, or (N, C, 1, L) / (N, C, L, 1) under any key (N x 1 x 1 x 40 is 40
    samples of one channel), and (N, D, 1, 1) reads as vectors. Labels are one whole number per
    example (an integer array, or floats holding whole numbers), -1 where unknown. Anything else
    is a ValueError naming the file and the key.
    """
    path = Path(path)
    if path.suffix == ".npz":
        content = read_npz(path)
    elif path.suffix in (".pt", ".pth"):
        content = read_pt(path)
        if isinstance(content, torch.Tensor):
            content = {"images" if content.dim() == 4 else "embeddings" if content.dim() == 2 else "x": content}
        if not isinstance(content, dict):
            raise ValueError(f"data_dir: {path} must hold a tensor or a dict of tensors, got {type(content).__name__}")
    else:
        raise ValueError(f"data_dir: {path} must be a .npz or .pt file")
    pre = "test_" if split == "test" else ""
    key = next((pre + k for k in _DATA_KEYS if pre + k in content), None)
    if key is None:
        raise ValueError(f"data_dir: {path} has none of the keys {pre}images/{pre}embeddings/{pre}signals/{pre}x/"
                         f"{pre}data "
                         f"(has {sorted(map(str, content))})")
    data = _data(_array(content, key, path), f"{path}: {key}")
    train_key = next((k for k in _DATA_KEYS if k in content), None)
    if pre and train_key is not None:
        train_shape = _sample_shape(_array(content, train_key, path).shape, f"{path}: {train_key}")
        if tuple(data.shape[1:]) != train_shape:
            raise ValueError(f"{path}: {key} holds examples of shape {tuple(data.shape[1:])} but {train_key} "
                             f"holds {train_shape}: the test split must match the train split")
    label_key = next((pre + k for k in _LABEL_KEYS if pre + k in content), None)
    labels = None
    if label_key is not None:
        labels = _labels(_array(content, label_key, path), data.shape[0], f"{path}: {label_key}")
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


# ------------------------------------------------------------------ any Dataset or DataLoader
class IndexedDataset(torch.utils.data.Dataset):
    """`dataset` whose items carry their index: `(i, x, y)` (y = -1 where the data set has no labels).
    Made by `with_index`; a DataLoader over it yields `(index, x, y)` batches the trainer can score."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        x, y = split_item(self.dataset[i], i)
        return int(i), x, y


def with_index(dataset: torch.utils.data.Dataset) -> IndexedDataset:
    """Wraps a map-style data set yielding `x` or `(x, y)` so that it yields `(i, x, y)`.

    Example:
        >>> import torch
        >>> ds = with_index(torch.utils.data.TensorDataset(torch.rand(5, 3), torch.arange(5)))
        >>> i, x, y = ds[2]
        >>> i, x.shape, y
        (2, torch.Size([3]), 2)
    """
    if isinstance(dataset, (IndexedDataset, ArrayDataset)):
        return dataset
    return IndexedDataset(dataset)


def _tensor(x, where: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if hasattr(x, "size") and hasattr(x, "mode"):  # a PIL image: (H, W) or (H, W, C) uint8
        return torch.from_numpy(np.array(x))
    raise ValueError(f"{where} must be a tensor, a numpy array or a PIL image, got {type(x).__name__}")


def _label(y, where: str) -> int:
    if y is None:
        return -1
    if isinstance(y, torch.Tensor) and y.numel() == 1 and not y.is_floating_point():
        return int(y)
    if isinstance(y, (int, np.integer)) and not isinstance(y, bool):
        return int(y)
    raise ValueError(f"{where} must be a whole-number label (an int), got "
                     f"{type(y).__name__}{' of shape ' + str(tuple(y.shape)) if hasattr(y, 'shape') else ''}; a data "
                     "set yields x, (x, y) or ((view1, view2), y)")


def split_item(item, i: int):
    """(x, y) of a data set's item: `x`, `(x, y)` or `(x, y, ...)`; y -1 when absent."""
    if isinstance(item, (tuple, list)) and len(item) >= 2 and not (
            isinstance(item, list) and len(item) == 2 and all(isinstance(v, torch.Tensor) for v in item)):
        return item[0], _label(item[1], f"data: item {i}'s label")
    if isinstance(item, (tuple, list)) and len(item) == 1:
        return item[0], -1
    return item, -1


def _is_views(x) -> bool:
    return isinstance(x, (tuple, list)) and len(x) == 2


class DatasetData:
    """A map-style Dataset (or a DataLoader's) read the way the trainer reads an `ArrayDataset`.

    Items may be `x`, `(x, y)` or `((view1, view2), y)` (two views made by the data set's own
    transform, as lightly and solo-learn data sets yield them); `transform`, when given, makes one
    view of an example (called twice per example per step). `batch` returns the clean examples in
    the canonical layout (`sample_layout`), as floats; `views` the two views, or None when neither
    the data set nor `transform` makes them (the trainer then augments `batch` itself).
    """

    def __init__(self, dataset: torch.utils.data.Dataset, *, transform=None, loader=None, name: str | None = None):
        if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__getitem__"):
            raise ValueError(f"data: needs a map-style Dataset (with __len__ and __getitem__) or a DataLoader over "
                             f"one, got {type(dataset).__name__}")
        try:
            n = len(dataset)
        except TypeError:
            raise ValueError(f"data: {type(dataset).__name__} has no len(); a map-style Dataset is needed") from None
        if n < 1:
            raise ValueError("data: the data set is empty")
        self.dataset = dataset.dataset if isinstance(dataset, IndexedDataset) else dataset
        self.transform = transform
        self.loader = loader
        self.name = name or type(self.dataset).__name__
        x0, _ = self._item(0)
        self.views_given = _is_views(x0) and transform is None
        if _is_views(x0) and transform is not None:
            raise ValueError("transform: the data set already yields two views per example; give no transform")
        first = _tensor(x0[0] if self.views_given else x0, "data: item 0")
        self.stored_shape = tuple(first.shape)
        self.layout = sample_layout(self.stored_shape, f"data: item 0 of shape {self.stored_shape}")
        self._n = n
        self._labels: torch.Tensor | None = None
        self._fingerprint: str | None = None

    def _item(self, i: int):
        return split_item(self.dataset[int(i)], int(i))

    def __len__(self) -> int:
        return self._n

    @property
    def kind(self) -> str:
        return KINDS[self.layout.modality]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.layout.shape

    def _stack(self, xs: list, where: str) -> torch.Tensor:
        ts = [_tensor(x, where) for x in xs]
        shapes = {tuple(t.shape) for t in ts}
        if len(shapes) > 1:
            raise ValueError(f"{where}: examples of different shapes {sorted(shapes)[:3]} cannot form a batch; "
                             "resize them in the data set, or pass transform=")
        return torch.stack(ts)

    def canonical(self, x: torch.Tensor, where: str = "data") -> torch.Tensor:
        """A stacked batch of stored examples in the canonical layout, as floats."""
        if tuple(x.shape[1:]) != self.stored_shape:
            raise ValueError(f"{where}: examples of shape {tuple(x.shape[1:])}, but item 0 has shape "
                             f"{self.stored_shape}; every example must have one shape (resize them, or pass transform=)")
        return to_float(self.layout.canonical(x), self.layout.modality, where)

    def batch(self, index: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """The clean examples at `index` (the first view, where the data set yields views)."""
        xs = [self._item(i)[0] for i in index.tolist()]
        if self.views_given:
            xs = [x[0] for x in xs]
        return self.canonical(self._stack(xs, "data"), "data").to(device)

    @property
    def makes_views(self) -> bool:
        """Whether `views` returns views (the data set's own, or `transform`'s), not None."""
        return self.views_given or self.transform is not None

    def views(self, index: torch.Tensor, device: torch.device | str = "cpu"):
        """(view1, view2) float batches of the examples at `index`, or None (see the class)."""
        if not self.makes_views:
            return None
        xs = [self._item(i)[0] for i in index.tolist()]
        pairs = xs if self.views_given else [(self.transform(x), self.transform(x)) for x in xs]
        made_by = "the data set's views" if self.views_given else "transform"
        for v in pairs[0]:  # a PIL image here would reach the model as (H, W, C) bytes
            if not isinstance(v, torch.Tensor) or not (v.is_floating_point() or v.dtype == torch.uint8):
                got = f"a {v.dtype} tensor" if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"{made_by} must be float tensors as the encoder takes them (end a torchvision "
                                 f"transform with ToTensor() or ToImage() + ToDtype(torch.float32, scale=True)), got {got}")
        return tuple(self._stack([p[k] for p in pairs], made_by).float().to(device) for k in (0, 1))

    @property
    def labels(self) -> torch.Tensor:
        """int64 [N], -1 where unknown (a data set's `targets` when it has them, else read item by item)."""
        if self._labels is None:
            targets = getattr(self.dataset, "targets", None)
            if targets is not None and len(targets) == len(self):
                self._labels = _labels(torch.as_tensor(targets), len(self), "data: targets")
            else:
                self._labels = _labels(np.array([self._item(i)[1] for i in range(len(self))]), len(self),
                                       "data: labels")
        return self._labels

    @property
    def has_labels(self) -> bool:
        return bool((self.labels >= 0).any())

    @property
    def num_classes(self) -> int:
        known = self.labels[self.labels >= 0]
        return int(known.max()) + 1 if known.numel() else 0

    def subset(self, index: torch.Tensor) -> DatasetData:
        return DatasetData(torch.utils.data.Subset(self.dataset, torch.as_tensor(index).long().tolist()),
                           transform=self.transform, name=self.name)

    @property
    def fingerprint(self) -> str:
        """sha256 over the data set's type, size and example shape, and a strided sample of up to 16
        clean examples (of the first view, where the data set makes views: those are random)."""
        if self._fingerprint is None:
            h = hashlib.sha256(f"{self.name}|{len(self)}|{self.layout}".encode())
            if not self.views_given:
                idx = torch.linspace(0, len(self) - 1, steps=min(16, len(self))).long()
                h.update(np.ascontiguousarray(self.batch(idx).numpy()).tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint


def as_data(data, *, transform=None, name: str | None = None):
    """The trainer's view of `data`: an `ArrayDataset` as it is, any other map-style Dataset (or a
    DataLoader's data set, keeping the loader) as a `DatasetData`. Anything else is a ValueError.

    Example:
        >>> import torch
        >>> d = as_data(torch.utils.data.TensorDataset(torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8)))
        >>> d.kind, d.sample_shape, float(d.batch(torch.arange(4)).max()) <= 1.0
        ('images', (3, 8, 8), True)
    """
    if isinstance(data, (ArrayDataset, DatasetData)) and transform is None:
        return data
    if isinstance(data, ArrayDataset):
        return DatasetData(data, transform=transform, name=name or data.name)
    if isinstance(data, DatasetData):
        return DatasetData(data.dataset, transform=transform, loader=data.loader, name=name or data.name)
    if isinstance(data, torch.utils.data.DataLoader):
        inner = data.dataset
        if isinstance(inner, ArrayDataset) and transform is None:
            return inner
        return DatasetData(inner, transform=transform, loader=data, name=name)
    if isinstance(data, torch.utils.data.Dataset) or hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        if isinstance(data, torch.Tensor):
            return ArrayDataset(data)
        return DatasetData(data, transform=transform, name=name)
    raise ValueError(f"data: expected a map-style torch Dataset, a DataLoader or an ArrayDataset, got "
                     f"{type(data).__name__}")
