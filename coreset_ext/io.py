"""coreset-ext's file formats: atomic, versioned, pickle-free.

Every file the library writes (a `Selection`, a `ScoreTracker` or `TrainingDynamics`, a run's
embeddings) is an uncompressed `.npz` of plain arrays plus a JSON metadata record (key
`__meta__`), written with `atomic_write_bytes`: a crash leaves the old file or the new one, never
half of one. One version policy for all of them: `save_npz` stamps `FORMAT_VERSION` (and the
library version, for the record) into the metadata, and `load_npz(path, kind=...)` refuses a file
of another kind or of a newer format version. Nothing is ever unpickled.

Readers never let a corrupt file escape as whatever the failing layer raises (zipfile, zlib, the
npy header, EOF): `reading(path, what)` turns it into one ValueError naming the file, so callers
and the CLI handle one type. A missing file stays a FileNotFoundError.

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
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import numpy as np

__all__ = ["FORMAT_VERSION", "atomic_write_bytes", "atomic_write_csv", "library_version", "load_npz", "read_npz",
           "reading", "save_npz"]

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


def atomic_write_csv(path: str | os.PathLike, fields, rows) -> None:
    """Writes `rows` (dicts; keys beyond `fields` are left out) as a CSV table with a header,
    atomically (`atomic_write_bytes`)."""
    import csv

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


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


@contextmanager
def reading(path: str | os.PathLike, what: str = "file") -> Iterator[None]:
    """Runs the read of `path` inside it; whatever a corrupt, truncated or empty file makes the
    reading layer raise (BadZipFile, EOFError, zlib.error, OSError Errno 22, UnpicklingError, a
    header's ValueError, a huge declared size's MemoryError) becomes one ValueError naming the file.

    A missing file, a folder or a permission problem is the file system's answer, not the file's
    content: it stays the OSError it is. Keep only the raw read inside: checks made on what was
    read raise their own ValueErrors outside.
    """
    try:
        yield
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as e:  # noqa: BLE001 - a corrupt file can fail in any layer; callers get one type
        why = " ".join(str(e).split())  # one line: the CLI prints it as its one error line
        why = why if isinstance(e, ValueError) else f"{type(e).__name__}: {why}" if why else type(e).__name__
        raise ValueError(f"path: {path} is not a readable {what} ({why})") from None


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of an .npz file (ours or a plain one), read without unpickling anything; a file
    that is not a readable .npz is a ValueError naming it (see `reading`)."""
    with reading(path, ".npz file"), open(path, "rb") as fh:
        # np.load reads anything that is not a zip as a .npy or a pickle: say what it is instead
        if fh.read(4) not in (b"PK\x03\x04", b"PK\x05\x06"):
            raise ValueError("it is not a zip archive")
        fh.seek(0)
        with np.load(fh, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}


def load_npz(path: str | os.PathLike, kind: str | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Reads what `save_npz` wrote, without unpickling anything: (arrays, metadata).

    With `kind`, also checks that the file holds that kind of object in a format version this
    library reads (ValueError naming the path otherwise).
    """
    arrays = read_npz(path)
    if "__meta__" not in arrays:
        raise ValueError(f"path: {path} has no __meta__ record: not a coreset-ext file")
    raw = arrays.pop("__meta__")
    with reading(path, "coreset-ext file (its __meta__ record is not JSON)"):
        meta = json.loads(raw.tobytes().decode())
    if not isinstance(meta, dict):
        raise ValueError(f"path: {path}: __meta__ must be a JSON object, got {type(meta).__name__}")
    if kind is not None:
        if meta.get("kind") != kind:
            raise ValueError(f"path: {path} is not a {kind} file (kind={meta.get('kind')!r})")
        version = meta.get("format_version", 0)
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise ValueError(f"path: {path}: format_version must be an int >= 0, got {version!r}")
        if version > FORMAT_VERSION:
            raise ValueError(f"path: {path} has format version {version}, newer than {FORMAT_VERSION}")
    return arrays, meta
