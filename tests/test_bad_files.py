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

# ----------------------------------------------------------------------------------------- CIFAR


class _Python2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for the published CIFAR batches: protocol 2, every str
    and bytes as a BINSTRING, arrays through numpy.core.multiarray._reconstruct."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        data = obj if isinstance(obj, bytes) else obj.encode("latin1")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def _python2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    _Python2Pickler(buf, protocol=2).dump(obj)
    # GLOBAL names are newline-terminated text: numpy 1's module name, as in the real files
    return buf.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


def _cifar_batch(rng, n, label_key="labels", classes=10):
    return {"batch_label": "training batch 1 of 5", label_key: rng.integers(0, classes, n).tolist(),
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "filenames": [f"img_{i}.png" for i in range(n)]}


def _write_cifar10(folder, rng, dump):
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = _cifar_batch(rng, 2)
        (folder / name).write_bytes(dump(batches[name]))
    return batches


_DUMPS = {
    "python2": _python2_pickle,  # the published files
    "protocol2": lambda d: pickle.dumps({k.encode(): v for k, v in d.items()}, protocol=2),  # bytes via _codecs
    "protocol5": lambda d: pickle.dumps({k.encode(): v for k, v in d.items()}, protocol=5),  # numpy's _frombuffer
}


@pytest.mark.parametrize("how", sorted(_DUMPS))
def test_genuine_cifar_batches_load(tmp_path, how):
    rng = np.random.default_rng(0)
    dump = _DUMPS[how]
    if how == "python2":  # check the helper writes what the published files hold
        ops = {str(arg) for op, arg, _ in __import__("pickletools").genops(dump(_cifar_batch(rng, 1)))
               if op.name == "GLOBAL"}
        assert ops == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
    batches = _write_cifar10(tmp_path / "cifar-10-batches-py", rng, dump)
    train = load_dataset("cifar10", split="train", data_dir=tmp_path)
    test = load_dataset("cifar10", split="test", data_dir=tmp_path)
    assert train.data.shape == (10, 3, 32, 32) and train.num_classes == 10
    assert train.labels.tolist() == sum((batches[f"data_batch_{i}"]["labels"] for i in range(1, 6)), [])
    assert torch.equal(test.data.reshape(2, -1), torch.from_numpy(batches["test_batch"]["data"]))

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("train", "test"):
        (folder / name).write_bytes(dump({**_cifar_batch(rng, 3, "fine_labels", 100), "coarse_labels": [0, 1, 2]}))
    assert load_dataset("cifar100", data_dir=tmp_path).num_classes == 100


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _EvalsOpen:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w')",)


@pytest.mark.parametrize("payload", [_RunsShell, _EvalsOpen])
@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar_batch_that_would_run_code_is_refused(tmp_path, payload, protocol):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar10(folder, rng, _DUMPS["protocol2"])
    marker = tmp_path / "pwned"
    evil = {b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"labels": [0, 1], b"x": payload(marker)}
    (folder / "data_batch_3").write_bytes(pickle.dumps(evil, protocol=protocol))
    with pytest.raises(ValueError, match=r"data_batch_3 is not a readable CIFAR batch \(.*refused: it names "
                                         r"(posix\.system|builtins\.eval|__builtin__\.eval)"):
        load_dataset("cifar10", data_dir=tmp_path)
    assert not marker.exists()
    # the command: one error line, exit 2, nothing ran
    assert main(["train", "--data", "cifar10", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run"),
                 "--epochs", "1"]) == 2
    assert not marker.exists()


def test_cifar_codecs_other_than_latin1_are_refused(tmp_path):
    import codecs

    class Zlib:
        def __reduce__(self):
            return codecs.encode, ("x", "rot13")

    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar10(folder, np.random.default_rng(2), _DUMPS["protocol2"])
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Zlib()}, protocol=2))
    with pytest.raises(ValueError, match="test_batch is not a readable CIFAR batch.*rot13"):
        load_dataset("cifar10", split="test", data_dir=tmp_path)


@pytest.mark.parametrize("edit,message", [
    (lambda d: {**d, b"data": d[b"data"].astype(np.float32)}, "data must be a uint8 array"),
    (lambda d: {**d, b"data": d[b"data"].reshape(-1)}, "data must be a uint8 array"),
    (lambda d: {**d, b"data": d[b"data"][:, :3000]}, "data must be a uint8 array"),
    (lambda d: {**d, b"data": d[b"data"].tolist()}, "data must be a uint8 array"),
    (lambda d: {k: v for k, v in d.items() if k != b"labels"}, "labels is missing"),
    (lambda d: {**d, b"labels": [0, 10]}, r"labels must hold whole numbers in \[0, 9\]"),
    (lambda d: {**d, b"labels": [0, -1]}, r"labels must hold whole numbers in \[0, 9\]"),
    (lambda d: {**d, b"labels": [0, 1, 2]}, "labels must be a 1-D array of 2 labels"),
    (lambda d: {**d, b"labels": [0, [1, 2]]}, "labels must be a 1-D array of 2"),
    (lambda d: {**d, b"labels": ["a", "b"]}, "labels must hold whole-number labels"),
    (lambda d: [d], "must hold a dict"),
])
def test_cifar_batch_of_the_wrong_structure(tmp_path, edit, message):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar10(folder, np.random.default_rng(3), _DUMPS["protocol2"])
    d = pickle.loads((folder / "data_batch_2").read_bytes(), encoding="bytes")
    (folder / "data_batch_2").write_bytes(pickle.dumps(edit(d), protocol=2))
    with pytest.raises(ValueError, match=f"data_batch_2.*{message}"):
        load_dataset("cifar10", data_dir=tmp_path)


@pytest.mark.parametrize("cut", [0, 1, 2, 40, 200, -10])
def test_truncated_cifar_batch(tmp_path, cut):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar10(folder, np.random.default_rng(4), _DUMPS["python2"])
    data = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(data[:cut])
    with pytest.raises(ValueError, match="test_batch is not a readable CIFAR batch"):
        load_dataset("cifar10", split="test", data_dir=tmp_path)


# ---------------------------------------------------------------------------------- tensor files


def _tensor_file(tmp_path, name="d.npz", **arrays):
    path = tmp_path / name
    if name.endswith(".npz"):
        np.savez(path, **arrays)
    else:
        torch.save(arrays, path)
    return path


@pytest.mark.parametrize("c", [1, 3, 4])
def test_channels_last_images_are_transposed(tmp_path, c):
    rng = np.random.default_rng(5)
    nchw = rng.integers(0, 256, (6, c, 10, 12), dtype=np.uint8)
    first = load_dataset("tensor", data_dir=_tensor_file(tmp_path, "a.npz", images=nchw))
    last = load_dataset("tensor", data_dir=_tensor_file(tmp_path, "b.npz", images=nchw.transpose(0, 2, 3, 1)))
    assert last.sample_shape == first.sample_shape == (c, 10, 12)
    assert torch.equal(last.data, first.data) and last.data.is_contiguous()
    nhwc = torch.from_numpy(nchw).permute(0, 2, 3, 1)
    pt = load_dataset("tensor", data_dir=_tensor_file(tmp_path, "c.pt", images=nhwc))
    assert torch.equal(pt.data, first.data)


@pytest.mark.parametrize("shape,message", [
    ((2, 3, 4, 4), r"of shape \(2, 3, 4, 4\) reads both as \(N, C, H, W\) images with C=3 and as \(N, H, W, C\) "
                   r"with C=4; store them as \(N, C, H, W\)"),
    ((2, 5, 8, 8), r"of shape \(2, 5, 8, 8\) has neither 1, 3 nor 4 channels.*store images as \(N, C, H, W\)"),
    ((2, 8, 8, 2), r"of shape \(2, 8, 8, 2\) has neither 1, 3 nor 4 channels"),
])
def test_images_whose_channels_cannot_be_told_are_refused(tmp_path, shape, message):
    path = _tensor_file(tmp_path, images=np.zeros(shape, np.uint8))
    with pytest.raises(ValueError, match=f"d.npz: images {message}"):
        load_dataset("tensor", data_dir=path)


def test_images_of_one_row_or_column_load_as_signals(tmp_path):
    # N x 1 x L x 1 and N x 1 x 1 x L are 1-D signals of length L (issue 17), not images
    values = np.random.default_rng(0).integers(0, 256, (3, 1, 8, 1), dtype=np.uint8)
    for shape in ((3, 1, 8, 1), (3, 1, 1, 8)):
        ds = load_dataset("tensor", data_dir=_tensor_file(tmp_path, images=values.reshape(shape)))
        assert ds.sample_shape == (1, 8)
        assert torch.equal(ds.data.reshape(3, 8), torch.from_numpy(values.reshape(3, 8)))  # kept as stored; scaled on the way in


def test_float_labels_holding_whole_numbers_are_converted(tmp_path):
    path = _tensor_file(tmp_path, embeddings=np.ones((4, 2), np.float32), labels=np.array([0.0, 2.0, -1.0, 1.0]))
    ds = load_dataset("tensor", data_dir=path)
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == [0, 2, -1, 1] and ds.num_classes == 3
    for dtype in (np.uint8, np.int16, np.uint64):
        path = _tensor_file(tmp_path, embeddings=np.ones((3, 2), np.float32), labels=np.array([2, 0, 1], dtype))
        assert load_dataset("tensor", data_dir=path).labels.tolist() == [2, 0, 1]


@pytest.mark.parametrize("labels,message", [
    (np.array([0.0, 1.5, 2.0, 0.0]), r"labels must hold whole numbers in \[-1, 2\*\*63 - 1\].*got 1.5 at example 1"),
    (np.array([0.0, np.nan, 2.0, 0.0]), r"labels must hold whole numbers.*got nan at example 1"),
    (np.array([0.0, np.inf, 2.0, 0.0]), r"labels must hold whole numbers.*got inf"),
    (np.array([1e19, 0, 0, 0]), r"labels must hold whole numbers"),
    (np.array([0, 2**64 - 1, 0, 0], np.uint64),
     r"labels must hold whole numbers.*got 18446744073709551615 at example 1"),
    (np.array([0, -2, 0, 0]), r"labels must hold whole numbers in \[-1, .*got -2"),
    (np.zeros((4, 1), np.int64), r"labels must be a 1-D array of 4 labels \(one per example\), got shape \(4, 1\)"),
    (np.zeros((2, 2), np.int64), r"labels must be a 1-D array of 4 labels"),
    (np.zeros(3, np.int64), r"labels must be a 1-D array of 4 labels.*got shape \(3,\)"),
    (np.zeros(4, bool), r"labels must hold whole-number labels \(an integer array\), got bool"),
    (np.zeros(4, np.complex64), r"labels must hold whole-number labels"),
    (np.array(["a", "b", "c", "d"]), r"labels must hold whole-number labels"),
])
def test_labels_that_would_be_truncated_flattened_or_wrapped_are_refused(tmp_path, labels, message):
    path = _tensor_file(tmp_path, embeddings=np.ones((4, 2), np.float32), labels=labels)
    with pytest.raises(ValueError, match=f"d.npz: {message}"):
        load_dataset("tensor", data_dir=path)


def test_test_labels_and_pt_labels_are_checked_too(tmp_path):
    path = _tensor_file(tmp_path, embeddings=np.ones((2, 2), np.float32), test_embeddings=np.ones((3, 2), np.float32),
                        test_labels=np.array([0, 1, 0.5]))
    load_dataset("tensor", data_dir=path)
    with pytest.raises(ValueError, match=r"d.npz: test_labels must hold whole numbers.*0.5 at example 2"):
        load_dataset("tensor", data_dir=path, split="test")
    pt = _tensor_file(tmp_path, "d.pt", embeddings=torch.ones(3, 2), y=torch.tensor([[0], [1], [2]]))
    with pytest.raises(ValueError, match=r"d.pt: y must be a 1-D array of 3 labels"):
        load_dataset("tensor", data_dir=pt)
    pt = _tensor_file(tmp_path, "e.pt", embeddings=torch.ones(3, 2), labels=[0, 1, 2])
    with pytest.raises(ValueError, match=r"e.pt: labels must be an array, got list"):
        load_dataset("tensor", data_dir=pt)


def test_array_dataset_refuses_labels_it_would_flatten_or_truncate():
    data = torch.zeros(3, 2)
    assert ArrayDataset(data, torch.tensor([0.0, 1.0, 2.0])).labels.tolist() == [0, 1, 2]
    for labels in (torch.tensor([[0], [1], [2]]), torch.tensor([0.5, 1.0, 2.0]), torch.tensor([0, 1]),
                   torch.tensor([0.0, float("nan"), 1.0]), torch.tensor([True, False, True])):
        with pytest.raises(ValueError, match="labels must"):
            ArrayDataset(data, labels)


@pytest.mark.parametrize("arrays,message", [
    ({"embeddings": np.ones((3, 2)), "test_embeddings": np.ones((3, 5))},
     r"test_embeddings holds examples of shape \(5,\) but embeddings holds \(2,\)"),
    ({"images": np.ones((3, 3, 8, 8)), "test_images": np.ones((3, 3, 8, 9))},
     r"test_images holds examples of shape \(3, 8, 9\) but images holds \(3, 8, 8\)"),
    ({"images": np.ones((3, 3, 8, 8)), "test_embeddings": np.ones((3, 192))},
     r"test_embeddings holds examples of shape \(192,\) but images holds \(3, 8, 8\)"),
])
def test_test_split_of_another_shape_is_refused(tmp_path, arrays, message):
    path = _tensor_file(tmp_path, **arrays)
    load_dataset("tensor", data_dir=path)
    with pytest.raises(ValueError, match=f"d.npz: {message}: the test split must match the train split"):
        load_dataset("tensor", data_dir=path, split="test")


def test_test_split_stored_channels_last_matches_a_channels_first_train_split(tmp_path):
    x = np.random.default_rng(6).random((3, 3, 8, 8)).astype(np.float32)
    path = _tensor_file(tmp_path, images=x, test_images=x.transpose(0, 2, 3, 1))
    assert torch.equal(load_dataset("tensor", data_dir=path, split="test").data, torch.from_numpy(x))


@pytest.mark.parametrize("arrays,message", [
    ({"embeddings": np.array([[0.0, np.nan]])}, "embeddings holds NaN or Inf"),
    ({"images": np.full((1, 3, 8, 8), np.inf, np.float32)}, "images holds NaN or Inf"),
    ({"embeddings": np.array([[1e300]])}, "embeddings holds NaN or Inf"),
    ({"embeddings": np.zeros((0, 3))}, r"embeddings must hold at least one example.*\(0, 3\)"),
    ({"embeddings": np.zeros((3, 0))}, r"embeddings must hold at least one example"),
    ({"embeddings": np.zeros((3, 2), np.complex64)}, "embeddings must hold real numbers"),
    ({"embeddings": np.zeros((3, 2), bool)}, "embeddings must hold real numbers"),
    ({"embeddings": np.zeros(3)}, r"embeddings must be \(N, C, H, W\) images or \(N, D\) embeddings, got shape \(3,\)"),
    ({"images": np.zeros((3, 8, 8))}, r"images must be \(N, C, H, W\) images or \(N, D\) embeddings"),
])
def test_data_arrays_of_the_wrong_kind_are_refused(tmp_path, arrays, message):
    with pytest.raises(ValueError, match=f"d.npz: {message}"):
        load_dataset("tensor", data_dir=_tensor_file(tmp_path, **arrays))


@pytest.mark.parametrize("name", ["d.npz", "d.pt"])
@pytest.mark.parametrize("how", ["empty", "garbage", "truncated", "pickle"])
def test_unreadable_tensor_files(tmp_path, name, how):
    path = _tensor_file(tmp_path, name, embeddings=np.ones((4, 3), np.float32) if name.endswith("npz")
                        else torch.ones(4, 3))
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "garbage": os.urandom(100), "truncated": data[: len(data) // 2],
                      "pickle": pickle.dumps({"embeddings": _RunsShell(tmp_path / "pwned")})}[how])
    with pytest.raises(ValueError, match=f"path: .*{name} is not a readable"):
        load_dataset("tensor", data_dir=path)
    assert not (tmp_path / "pwned").exists()


def test_image_folder_with_a_corrupt_image(tmp_path):
    from PIL import Image

    (tmp_path / "cat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cat" / "a.png")
    (tmp_path / "cat" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match=r"b.png is not a readable image"):
        load_dataset("folder", data_dir=tmp_path)
    with pytest.raises(ValueError, match="is not a directory"):
        load_dataset("folder", data_dir=tmp_path / "cat" / "a.png")


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


# ------------------------------------------------------------------------------------ selections


def _selection_file(tmp_path, indices=None, scores=None, **meta_edits):
    path = tmp_path / "sel.npz"
    Selection(torch.tensor([4, 0, 2]), "css", dataset_size=6, scores=torch.arange(6.0)).save(path)
    arrays, meta = load_npz(path)
    if indices is not None:
        arrays["indices"] = indices
    if scores is not None:
        arrays["scores"] = scores
    for k, v in meta_edits.items():
        if v is _DROP:
            meta.pop(k)
        else:
            meta[k] = v
    save_npz(path, arrays, meta)
    return path


_DROP = object()


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64, np.int8, np.int16, np.int32])
def test_selection_indices_of_any_integer_dtype_load_as_int64(tmp_path, dtype):
    sel = Selection.load(_selection_file(tmp_path, indices=np.array([4, 0, 2], dtype)))
    assert sel.indices.dtype == torch.int64 and sel.indices.tolist() == [4, 0, 2]


@pytest.mark.parametrize("edit,message", [
    ({"indices": np.array([4, 2**64 - 1, 2], np.uint64)}, r"indices must be in \[0, 6\).*18446744073709551615"),
    ({"indices": np.array([4, 2**63, 2], np.uint64)}, r"indices must be in \[0, 6\)"),
    ({"indices": np.array([4, 0, 6], np.uint16)}, r"indices must be in \[0, 6\)"),
    ({"indices": np.array([4.0, 0.0, 2.0])}, "indices must be a 1-D integer array, got float64"),
    ({"indices": np.array([[4, 0, 2]])}, r"indices must be a 1-D integer array, got int64 of shape \(1, 3\)"),
    ({"indices": np.array([True, False, True])}, "indices must be a 1-D integer array, got bool"),
    ({"scores": np.arange(5.0)}, r"scores must be a 1-D float array of one score per example \(6\).*\(5,\)"),
    ({"scores": np.arange(6)}, "scores must be a 1-D float array.*got int64"),
    ({"scores": np.ones((6, 1))}, "scores must be a 1-D float array"),
    ({"dataset_size": 6.5}, r"dataset_size must be an int in \[0, 9223372036854775807\], got 6.5"),
    ({"dataset_size": -6}, "dataset_size must be an int in .*, got -6"),
    ({"dataset_size": 10**20}, "dataset_size must be an int in .*, got 100000000000000000000"),
    ({"dataset_size": "6"}, "dataset_size must be an int"),
    ({"dataset_size": True}, "dataset_size must be an int"),
    ({"dataset_size": _DROP}, "dataset_size: missing"),
    ({"budget": 4}, "budget: the file records 4 but holds 3 indices"),
    ({"budget": 3.5}, "budget: the file records 3.5"),
    ({"budget": -1}, "budget: the file records -1"),
    ({"budget": True}, "budget: the file records True"),
    ({"method": 3}, "method must be a string, got 3"),
    ({"method": _DROP}, "method: missing"),
    ({"options": [1]}, "options must be a dict"),
    ({"seed": 0.5}, "seed must be an int"),
    ({"fingerprint": 7}, "fingerprint must be None or a string"),
])
def test_hand_edited_selection_files_are_refused(tmp_path, edit, message):
    arrays = {k: edit.pop(k) for k in ("indices", "scores") if k in edit}
    path = _selection_file(tmp_path, **arrays, **edit)
    with pytest.raises(ValueError, match=f"path: .*sel.npz holds an invalid Selection: {message}"):
        Selection.load(path)


def test_corrupt_selection_files_are_value_errors(tmp_path):
    path = _selection_file(tmp_path)
    good = path.read_bytes()
    for what, data in _corruptions(good):
        path.write_bytes(data)
        try:
            Selection.load(path)
        except ValueError as e:
            assert "sel.npz" in str(e), what


# --------------------------------------------------------------------------- trackers, dynamics


def _save_edited(obj, path, edit_arrays, meta_edit):
    """obj saved to path, then its arrays (edit_arrays, in place) and metadata edited by hand."""
    obj.save(path)
    arrays, meta = load_npz(path)
    edit_arrays(arrays)
    meta.update(meta_edit or {})
    save_npz(path, arrays, meta)
    return path


def _tracker_file(tmp_path, edit=None, meta_edit=None):
    t = cx.ScoreTracker(5, ("css",))
    t.update(torch.tensor([0, 3, 3]), css=torch.tensor([0.5, 0.25, 1.0]))
    return _save_edited(t, tmp_path / "t.npz", lambda arrays: arrays.update(edit or {}), meta_edit)


@pytest.mark.parametrize("edit,meta_edit,message", [
    ({"count/css": np.array([1, 0, 0, -2, 0], np.float32)}, None,
     "count/css must hold whole counts >= 0, got -2.0 at example 3"),
    ({"count/css": np.array([1, 0, 0.5, 2, 0], np.float32)}, None, "count/css must hold whole counts >= 0, got 0.5"),
    ({"count/css": np.array([np.nan, 0, 0, 2, 0], np.float32)}, None, "count/css must hold whole counts >= 0, got nan"),
    ({"count/css": np.array([np.inf, 0, 0, 2, 0], np.float32)}, None, "count/css must hold whole counts"),
    ({"count/css": np.ones(4, np.float32)}, None, r"count/css: expected shape \(5,\) \(num_samples\), got \(4,\)"),
    (None, {"num_samples": 5.5}, "num_samples must be an int >= 1, got 5.5"),
    (None, {"num_samples": -5}, "num_samples must be an int >= 1"),
    (None, {"num_samples": 10**12}, r"sum/css: expected shape \(1000000000000,\) \(num_samples\), got \(5,\)"),
    (None, {"metrics": "css"}, "metrics must be a list, got 'css'"),
    (None, {"metrics": ["css", "css"]}, "metrics must be distinct"),
    (None, {"fingerprint": 3}, "fingerprint must be None or a string"),
])
def test_inconsistent_tracker_files_are_refused(tmp_path, edit, meta_edit, message):
    path = _tracker_file(tmp_path, edit, meta_edit)
    with pytest.raises(ValueError, match=f"t.npz holds an invalid ScoreTracker: {message}"):
        cx.ScoreTracker.load(path)


def test_tracker_sums_may_be_nan_or_uncounted(tmp_path):
    """nan='ignore' adds NaN as it is; the fused losses add into sums without counting."""
    path = _tracker_file(tmp_path, {"sum/css": np.array([np.nan, 2.0, 0, 1.25, 0], np.float32)})
    back = cx.ScoreTracker.load(path)
    assert back.sums["css"][1] == 2.0 and back.counts["css"][1] == 0


def _dynamics(n=6, steps=3):
    gen = torch.Generator().manual_seed(0)
    dyn = cx.TrainingDynamics(n, el2n_epochs=2)
    for epoch in range(steps):
        index = torch.tensor([0, 1, 2, 2])
        dyn.update(torch.randn(4, 3, generator=gen), torch.randint(0, 3, (4,), generator=gen), index, epoch=epoch)
    return dyn


def _dynamics_file(tmp_path, edit=None, meta_edit=None):
    def set_entries(arrays):
        for k, (i, v) in (edit or {}).items():
            arrays[k][i] = v

    return _save_edited(_dynamics(), tmp_path / "d.npz", set_entries, meta_edit)


@pytest.mark.parametrize("edit,meta_edit,message", [
    ({"seen": (0, -3)}, None, "seen must hold whole counts >= 0, got -3.0 at example 0"),
    ({"seen": (4, 2.5)}, None, "seen must hold whole counts >= 0, got 2.5 at example 4"),
    ({"forget_events": (1, -1)}, None, "forget_events must hold whole counts >= 0"),
    ({"el2n_count": (0, np.nan)}, None, "el2n_count must hold whole counts >= 0, got nan"),
    ({"correct_count": (0, 50)}, None,
     r"correct_count must be at most seen \(one per sighting\), got 50.0 at example 0"),
    ({"forget_events": (2, 50)}, None, "forget_events must be at most seen"),
    ({"el2n_count": (1, 50)}, None, "el2n_count must be at most seen"),
    ({"aum_sum": (0, np.nan)}, None, r"aum_sum must be finite and within \[-seen, seen\].*got nan at example 0"),
    ({"aum_sum": (0, np.inf)}, None, "aum_sum must be finite"),
    ({"aum_sum": (0, 40.0)}, None, r"aum_sum must be finite and within \[-seen, seen\].*got 40.0"),
    ({"aum_sum": (5, 0.5)}, None, r"aum_sum must be finite and within \[-seen, seen\].*at example 5"),
    ({"el2n_sum": (0, -0.5)}, None, r"el2n_sum must be finite and within \[0, sqrt\(2\) \* el2n_count\]"),
    ({"el2n_sum": (2, np.nan)}, None, "el2n_sum must be finite"),
    ({"last_correct": (0, 5)}, None, "last_correct must be -1, 0 or 1, got 5 at example 0"),
    ({"last_correct": (0, -1)}, None,
     "last_correct must be -1 exactly for the examples never seen, got -1 at example 0"),
    ({"last_correct": (5, 1)}, None, "last_correct must be -1 exactly for the examples never seen, got 1 at example 5"),
    (None, {"steps": -1}, "steps must be an int >= 0, got -1"),
    (None, {"steps": 2.5}, "steps must be an int >= 0, got 2.5"),
    (None, {"steps": 0}, "steps must be >= 1 when examples were seen, got 0"),
    (None, {"el2n_epochs": -1}, "el2n_epochs must be an int >= 0"),
    (None, {"el2n_epochs": "2"}, "el2n_epochs must be an int >= 0"),
    (None, {"num_samples": 6.0}, "num_samples must be an int >= 1, got 6.0"),
])
def test_inconsistent_dynamics_files_are_refused(tmp_path, edit, meta_edit, message):
    path = _dynamics_file(tmp_path, edit, meta_edit)
    with pytest.raises(ValueError, match=f"d.npz holds an invalid TrainingDynamics: {message}"):
        cx.TrainingDynamics.load(path)


def test_missing_dynamics_record_fields_are_named(tmp_path):
    path = tmp_path / "d.npz"
    _dynamics().save(path)
    arrays, meta = load_npz(path)
    for key in ("steps", "el2n_epochs", "num_samples"):
        save_npz(path, arrays, {k: v for k, v in meta.items() if k != key})
        with pytest.raises(ValueError, match=f"d.npz holds an invalid TrainingDynamics: {key}: missing"):
            cx.TrainingDynamics.load(path)


def test_a_refused_state_leaves_the_object_as_it_was():
    dyn = _dynamics()
    before = {k: v.clone() for k, v in dyn.buffers.items()}
    state = dyn.state_dict()
    state["seen"] = state["seen"].clone()
    state["aum_sum"] = torch.full_like(state["aum_sum"], 0.25)
    state["seen"][0] = -1
    with pytest.raises(ValueError, match="seen must hold whole counts"):
        dyn.load_state_dict(state)
    assert all(torch.equal(before[k], v) for k, v in dyn.buffers.items()) and dyn.steps == 3


def test_genuine_dynamics_and_trackers_round_trip(tmp_path):
    dyn = _dynamics(n=9, steps=5)
    dyn.save(tmp_path / "d.npz")
    back = cx.TrainingDynamics.load(tmp_path / "d.npz")
    assert back.steps == 5 and all(torch.equal(dyn.buffers[k], v) for k, v in back.buffers.items())
    cx.TrainingDynamics(4).save(tmp_path / "fresh.npz")  # never updated: steps 0, nothing seen
    assert cx.TrainingDynamics.load(tmp_path / "fresh.npz").steps == 0


def test_corrupt_tracker_and_dynamics_files_are_value_errors(tmp_path):
    for cls, path in ((cx.ScoreTracker, _tracker_file(tmp_path)), (cx.TrainingDynamics, _dynamics_file(tmp_path))):
        good = path.read_bytes()
        for what, data in _corruptions(good):
            path.write_bytes(data)
            try:
                cls.load(path)
            except ValueError as e:
                assert path.name in str(e), what


# ---------------------------------------------------------------------------------- embeddings


@pytest.mark.parametrize("name,content,message", [
    ("e.npy", np.array([[0.0, np.nan]]), "holds NaN or Inf embeddings"),
    ("e.npy", np.ones(3), r"must hold a 2-D float array \[N, D\], got float64 array of shape \(3,\)"),
    ("e.npy", np.ones((3, 2), np.int64), r"must hold a 2-D float array \[N, D\], got int64"),
    ("e.npy", np.ones((0, 2)), r"must hold at least one embedding.*\(0, 2\)"),
    ("e.pt", torch.tensor([[float("inf"), 0.0]]), "holds NaN or Inf embeddings"),
    ("e.pt", {"train": torch.ones(2, 2)}, r"must hold a 2-D float array \[N, D\], got dict"),
    ("e.npz", {"train": np.array([[np.nan]])}, "holds NaN or Inf embeddings"),
])
def test_embeddings_files_of_the_wrong_content(tmp_path, name, content, message):
    path = tmp_path / name
    if name.endswith(".npy"):
        np.save(path, content)
    elif name.endswith(".pt"):
        torch.save(content, path)
    else:
        np.savez(path, **content)
    with pytest.raises(ValueError, match=f"path: .*{name} {message}"):
        load_embeddings(str(path))


@pytest.mark.parametrize("name", ["e.npy", "e.npz", "e.pt"])
def test_unreadable_embeddings_files(tmp_path, name):
    path = tmp_path / name
    x = np.ones((4, 3), np.float32)
    np.save(path, x) if name == "e.npy" else np.savez(path, train=x) if name == "e.npz" else torch.save(
        torch.from_numpy(x), path)
    good = path.read_bytes()
    marker = tmp_path / "pwned"
    bad = [b"", good[: len(good) // 2], os.urandom(64), pickle.dumps(_RunsShell(marker))]
    for data in bad:
        path.write_bytes(data)
        with pytest.raises(ValueError, match=f"path: .*{name} is not a readable"):
            load_embeddings(str(path))
    assert not marker.exists()
    with pytest.raises(FileNotFoundError):
        load_embeddings(str(tmp_path / ("absent" + name[1:])))
