"""coreset-ext's file formats: atomic, versioned, pickle-free.

Every file the library writes (a `Selection`, a `ScoreTracker` or `TrainingDynamics`, a run's
embeddings) is an uncompressed `.npz` of plain arrays plus a JSON metadata record (key
`__meta__`), written with `atomic_write_bytes`: a crash leaves the old file or the new one, never
half of one. One version policy for all of them: `save_npz` stamps `FORMAT_VERSION` (and the
library version, for the record) into the metadata, and `load_npz(path, kind=...)` refuses a file
of another kind or of a newer format version. Nothing is ever unpickled.

Example:
    >>> import numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "x.npz")
    >>> save_npz(path, {"indices": np.arange(3)}, {"kind": "Example"})
    >>> arrays, meta = load_npz(path, kind="Example")
    >>> arrays["indices"].tolist(), meta["format_version"]
    ([0, 1, 2], 1)
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np

__all__ = ["FORMAT_VERSION", "atomic_write_bytes", "library_version", "load_npz", "save_npz"]

# The version of the layout of every file below; a reader refuses files newer than itself.
FORMAT_VERSION = 1


def library_version() -> str:
    """The installed coreset-ext version (recorded in files for provenance, never checked)."""
    try:
        return metadata.version("coreset-ext")
    except metadata.PackageNotFoundError:
        return "unknown"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` so that a crash at any moment leaves either the old file or the new.

    The bytes go to a temporary file in the same directory, are fsynced, then renamed over `path`
    (rename is atomic on POSIX), and the directory entry is fsynced too.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Atomically saves arrays plus a JSON metadata record (key `__meta__`) as an uncompressed npz.

    `meta` should name the `kind` of object; the format and library versions are added unless
    `meta` already holds them (a file read with `load_npz` and written back keeps its own).
    """
    meta = {"format_version": FORMAT_VERSION, "library_version": library_version(), **meta}
    payload = dict(arrays)
    payload["__meta__"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **payload)
    atomic_write_bytes(path, buf.getvalue())


def load_npz(path: str | os.PathLike, kind: str | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Reads what `save_npz` wrote, without unpickling anything: (arrays, metadata).

    With `kind`, also checks that the file holds that kind of object in a format version this
    library reads (ValueError naming the path otherwise).
    """
    with np.load(path, allow_pickle=False) as f:
        if "__meta__" not in f.files:
            raise ValueError(f"path: {path} has no __meta__ record: not a coreset-ext file")
        arrays = {k: f[k] for k in f.files if k != "__meta__"}
        meta = json.loads(bytes(f["__meta__"]).decode())
    if kind is not None:
        if meta.get("kind") != kind:
            raise ValueError(f"path: {path} is not a {kind} file (kind={meta.get('kind')!r})")
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"path: {path} has format version {meta['format_version']}, newer than {FORMAT_VERSION}")
    return arrays, meta
