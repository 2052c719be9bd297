"""Readers under bad input (issue 16): no code runs from a data file, and every corrupt, truncated,
hand-edited or inconsistent file is a ValueError naming the file and the field, never a silent
wrong answer or another exception type. A missing file stays a FileNotFoundError."""

import io
import os
import pickle
import struct

import numpy as np
import pytest
import torch

import coreset_ext as cx
from coreset_ext.cli import main
from coreset_ext.io import load_npz, save_npz
from coreset_ext.select import Selection
from coreset_ext.train.data import ArrayDataset, load_dataset
from coreset_ext.train.embed import load_embeddings

# ----------------------------------------------------------------------------------- .npz files


def _corruptions(data: bytes):
    yield "empty", b""
    yield "garbage", bytes(np.random.default_rng(7).integers(0, 256, 300, dtype=np.uint8))
    yield "npy", np.lib.format.magic(1, 0) + b"garbage"
    for cut in range(1, len(data), max(1, len(data) // 40)):
        yield f"truncated at {cut}", data[:cut]


def test_load_npz_turns_every_corruption_into_a_value_error_naming_the_file(tmp_path):
    path = tmp_path / "x.npz"
    save_npz(path, {"indices": np.arange(5), "scores": np.ones(5, np.float32)}, {"kind": "X"})
    good = path.read_bytes()
    for what, data in _corruptions(good):
        path.write_bytes(data)
        try:
            load_npz(path, kind="X")
        except ValueError as e:
            assert str(path) in str(e) and "\n" not in str(e), what
    with pytest.raises(FileNotFoundError):
        load_npz(tmp_path / "absent.npz")


@pytest.mark.parametrize("meta,message", [
    (b"not json", "not a readable coreset-ext file"),
    (b"[1, 2]", "__meta__ must be a JSON object, got list"),
    (b'{"kind": "X", "format_version": "1"}', "format_version must be an int >= 0, got '1'"),
    (b'{"kind": "X", "format_version": 99}', "format version 99, newer than 1"),
    (b'\xff\xfe', "not a readable coreset-ext file"),
])
def test_load_npz_refuses_a_bad_meta_record(tmp_path, meta, message):
    path = tmp_path / "x.npz"
    np.savez(path, a=np.arange(2), __meta__=np.frombuffer(meta, np.uint8))
    with pytest.raises(ValueError, match=f"x.npz.*{message}"):
        load_npz(path, kind="X")
