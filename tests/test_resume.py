"""Issue 16: trustworthy under bad input. Resume that means resume (a run continues only with the
settings it was trained with, or is refused naming each change), nothing written before the
checks pass, checkpoints verified by checksum, strict option parsing, no silent merges of
different selections, and one clear line instead of a traceback."""

import csv
import io
import json
import re
import shutil

import numpy as np
import pytest
import torch

from coreset_ext.cli import main
from coreset_ext.select import Selection
from coreset_ext.select.registry import parse_option
from coreset_ext.train import TrainConfig, Trainer, load_dataset
from coreset_ext.train.data import ArrayDataset
from coreset_ext.train.evaluate import selection_labels, subsets_to_evaluate
from coreset_ext.train.trainer import read_checkpoint, resolve_device, write_checkpoint

BASE = dict(epochs=1, batch_size=16, width=8, proj_dim=16, proj_hidden=32, queue_size=32, progress=False,
            device="cpu")


def digits(n=32, start=0):
    full = load_dataset("digits")
    return ArrayDataset(full.data[start:start + n].clone(), full.labels[start:start + n].clone(),
                        name="digits/slice", num_classes=10)


def snapshot(run):
    """Every file of a run directory, by name, as bytes: to show that nothing was written."""
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def trained(run, ds=None, **cfg):
    Trainer(TrainConfig(**{**BASE, **cfg}), ds or digits(), run).fit()
    return snapshot(run)


# ------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("field,old,new", [
    ("lr", 2e-3, 0.01), ("temperature", 0.5, 0.3), ("seed", 0, 1), ("batch_size", 16, 8),
    ("css_on", "projection", "backbone"), ("width", 8, 16), ("method", "simclr", "moco"),
    ("proj_dim", 16, 8), ("weight_decay", 1e-5, 0.0), ("momentum", 0.99, 0.9),
])
def test_resume_with_a_changed_setting_is_refused_naming_it_and_writes_nothing(tmp_path, field, old, new):
    before = trained(tmp_path, **{field: old})
    with pytest.raises(ValueError, match=f"{field}: {old} in the run, {new} now.*--no-resume"):
        Trainer(TrainConfig(**{**BASE, field: new}), digits(), tmp_path).fit()
    assert snapshot(tmp_path) == before  # config.json still describes the run that is there


def test_every_changed_field_is_named_in_one_error(tmp_path):
    trained(tmp_path)
    with pytest.raises(ValueError) as e:
        Trainer(TrainConfig(**{**BASE, "lr": 0.01, "seed": 3, "css_on": "backbone"}), digits(), tmp_path).fit()
    msg = str(e.value)
    assert "lr: 0.002 in the run, 0.01 now" in msg and "seed: 0 in the run, 3 now" in msg
    assert "css_on: projection in the run, backbone now" in msg and "\n" not in msg


def test_another_data_set_of_the_same_size_is_refused_before_config_json_is_written(tmp_path):
    """The data-loss bug: the refusal came after config.json had been overwritten with the new
    data set's name and fingerprint."""
    before = trained(tmp_path, digits(32, start=0))
    other = digits(32, start=100)
    with pytest.raises(ValueError, match=f"data set: {digits().fingerprint} in the run, {other.fingerprint} now"):
        Trainer(TrainConfig(**BASE), other, tmp_path).fit()
    assert snapshot(tmp_path) == before


def test_epochs_may_be_raised_to_continue_but_not_lowered_below_those_done(tmp_path):
    before = trained(tmp_path, epochs=2)
    with pytest.raises(ValueError, match="epochs: 2 already trained, 1 now"):
        Trainer(TrainConfig(**{**BASE, "epochs": 1}), digits(), tmp_path).fit()
    assert snapshot(tmp_path) == before
    more = Trainer(TrainConfig(**{**BASE, "epochs": 3}), digits(), tmp_path)
    result = more.fit()
    straight = Trainer(TrainConfig(**{**BASE, "epochs": 3}), digits(), tmp_path / "straight").fit()
    assert more.epoch == 3 and len(result.history) == 3
    assert torch.equal(result.tracker.sums["css"], straight.tracker.sums["css"])  # as if never stopped
    assert json.loads((tmp_path / "config.json").read_text())["train"]["epochs"] == 3


def test_device_progress_and_checkpoint_interval_may_change_on_resume(tmp_path):
    trained(tmp_path, device="auto", epochs=1)
    t = Trainer(TrainConfig(**{**BASE, "device": "cpu", "progress": True, "checkpoint_every": 2, "epochs": 2}),
                digits(), tmp_path)
    t.fit()
    assert t.epoch == 2


def test_no_resume_replaces_the_run_only_once_its_checks_pass(tmp_path):
    before = trained(tmp_path)
    (tmp_path / "embeddings.npz").write_bytes(b"the old run's")  # what the pipeline writes after fit
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="device"):  # a check of the new run fails: the old run stays
        Trainer(TrainConfig(**{**BASE, "lr": 0.01, "device": "tpu"}), digits(), tmp_path).fit(resume=False)
    with pytest.raises(ValueError, match="at least 2 examples"):
        Trainer(TrainConfig(**{**BASE, "lr": 0.01}), digits(1), tmp_path).fit(resume=False)
    assert snapshot(tmp_path) == before
    # Afresh with other settings, interrupted before its first checkpoint: none of the old run's
    # files remains beside the new config.json.
    Trainer(TrainConfig(**{**BASE, "lr": 0.01, "epochs": 2}), digits(), tmp_path).fit(resume=False,
                                                                                     stop_after_epochs=0)
    assert sorted(snapshot(tmp_path)) == ["config.json"]
    assert json.loads((tmp_path / "config.json").read_text())["train"]["lr"] == 0.01
    # and the config.json of a run that never checkpointed is what a resume is compared with
    with pytest.raises(ValueError, match=r"config.json was trained with other settings: lr: 0.01 in the run"):
        Trainer(TrainConfig(**BASE), digits(), tmp_path).fit()
    Trainer(TrainConfig(**{**BASE, "lr": 0.01, "epochs": 2}), digits(), tmp_path).fit()
    assert read_checkpoint(tmp_path / "checkpoints" / "last.pt")["run"]["train"]["lr"] == 0.01


def test_continuing_a_finished_run_removes_its_old_outputs_first(tmp_path):
    """Between the start of a continuation and its end, scores.npz and embeddings.npz of the old
    end would be read as the outputs of the config.json that now says more epochs."""
    trained(tmp_path, epochs=1)
    (tmp_path / "embeddings.npz").write_bytes(b"the old run's")
    Trainer(TrainConfig(**{**BASE, "epochs": 3}), digits(), tmp_path).fit(stop_after_epochs=1)
    assert not (tmp_path / "scores.npz").exists() and not (tmp_path / "embeddings.npz").exists()
    Trainer(TrainConfig(**{**BASE, "epochs": 3}), digits(), tmp_path).fit()
    assert (tmp_path / "scores.npz").is_file()


def _truncate(path):
    path.write_bytes(path.read_bytes()[:5000])


def _empty(path):
    path.write_bytes(b"")


def _garbage(path):
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_without_checksum(path):
    state = read_checkpoint(path)
    state["epoch"] = 0
    buf = io.BytesIO()
    torch.save(state, buf)
    outer = torch.load(path, weights_only=True)
    outer["payload"] = buf.getvalue()  # an edited state under the old sha256
    torch.save(outer, path)


def _old_format(path):
    torch.save({"format_version": 1, "config": {}, "epoch": 1}, path)  # before checksums


def _version_2(path):
    """A checksummed checkpoint of the trainer that kept its own MoCo queue (version 2)."""
    outer = torch.load(path, weights_only=True)
    outer["format_version"] = 2
    torch.save(outer, path)


def _folder(path):
    path.unlink()
    path.mkdir()


def _missing_key(path):
    state = read_checkpoint(path)
    del state["tracker"]
    write_checkpoint(path, state)


def _another_model(path):
    state = read_checkpoint(path)
    other = Trainer(TrainConfig(**{**BASE, "width": 4}), digits())
    state["model"] = other.model.state_dict()
    write_checkpoint(path, state)


@pytest.mark.parametrize("damage,message", [
    (_truncate, "cannot be read: it is truncated, empty or not a checkpoint"),
    (_empty, "cannot be read: it is truncated, empty or not a checkpoint"),
    (_garbage, "cannot be read: it is truncated, empty or not a checkpoint"),
    (_flip_a_byte, "(cannot be read|fails its sha256 check)"),
    (_edit_without_checksum, "fails its sha256 check"),
    (_old_format, "is not a checkpoint with a checksum"),
    (_version_2, "has checkpoint version 2, written before the trainer kept its MoCo queue in cx.nn.MoCoLoss"),
    (_folder, "cannot be read"),
    (_missing_key, r"lacks \['tracker'\]"),
    (_another_model, "does not fit this run's model"),
])
def test_damaged_checkpoints_are_one_clear_error_naming_the_file(tmp_path, damage, message, capsys):
    trained(tmp_path)
    path = tmp_path / "checkpoints" / "last.pt"
    damage(path)
    config = (tmp_path / "config.json").read_bytes()
    with pytest.raises(ValueError, match=f"^checkpoint: {re.escape(str(path))} {message}"):
        Trainer(TrainConfig(**BASE), digits(), tmp_path).fit()
    assert (tmp_path / "config.json").read_bytes() == config
    # the command line prints it as one line
    capsys.readouterr()
    data = tmp_path.parent / f"{tmp_path.name}_data.npz"
    np.savez(data, images=digits().data.numpy(), labels=digits().labels.numpy())
    assert main(["train", "--out", str(tmp_path), "--data", "tensor", "--data-dir", str(data), "--epochs", "1",
                 "--width", "8", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "checkpoint" in err


def test_checkpoint_round_trip_keeps_the_state(tmp_path):
    state = Trainer(TrainConfig(**BASE), digits()).state_dict()
    path = tmp_path / "c.pt"
    write_checkpoint(path, state)
    back = read_checkpoint(path)
    assert back["run"] == state["run"] and torch.equal(back["torch_rng"], state["torch_rng"])


# ------------------------------------------------------------------------------ bad settings


def test_a_single_example_data_set_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 2 examples.*BatchNorm needs two per batch.*got 1"):
        Trainer(TrainConfig(**BASE), digits(1))


@pytest.mark.parametrize("device,message", [
    ("tpu", "device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got 'tpu'"),
    ("", "device must be"),
    ("cuda", "'cuda' asks for CUDA, but"),
    ("cuda:7", "'cuda:7'"),
])
def test_a_device_that_is_not_here_is_a_clear_error(device, message):
    if device.startswith("cuda") and torch.cuda.is_available() and device != "cuda:7":
        pytest.skip("CUDA is here")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_device(device)


@pytest.mark.parametrize("field,value", [
    ("width", 10**8), ("queue_size", 10**12), ("proj_dim", 10**9), ("proj_hidden", 10**9), ("batch_size", 10**15),
    ("batch_size", 1), ("lr", float("nan")), ("lr", -1.0), ("weight_decay", float("inf")), ("momentum", 2.0),
    ("seed", -1), ("seed", 2**70), ("amp", "yes"), ("epochs", 0), ("device", 3),
])
def test_settings_that_cannot_run_are_refused_naming_them(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        TrainConfig(**{**BASE, field: value})


# ---------------------------------------------------------------------------------- options


@pytest.mark.parametrize("method,key,text,value", [
    ("kcenter", "normalize", "False", False), ("kcenter", "normalize", "false", False),
    ("kcenter", "normalize", "0", False), ("kcenter", "normalize", "True", True),
    ("kcenter", "normalize", "true", True), ("kcenter", "normalize", "1", True),
    ("prototypes", "n_clusters", "20", 20), ("elfs", "beta", "0.5", 0.5), ("elfs", "beta", "none", None),
    ("css", "order", "highest", "highest"), ("balanced_random", "by", "class", "class"),
    ("elfs", "beta_grid", "[0.1, 0.2]", [0.1, 0.2]), ("elfs", "deep_cluster", '{"epochs": 2}', {"epochs": 2}),
])
def test_option_values_are_read_as_the_type_the_method_declares(method, key, text, value):
    got = parse_option(method, key, text)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("method,key,text,message", [
    ("kcenter", "normalize", "yes", "normalize must be a bool (true/True/1 or false/False/0), got 'yes'"),
    ("kcenter", "normalize", "", "normalize must be a bool"),
    ("prototypes", "n_clusters", "2.5", "n_clusters must be an int, got '2.5'"),
    ("prototypes", "n_clusters", "abc", "n_clusters must be an int, got 'abc'"),
    ("elfs", "beta", "nan", "beta must be a finite real number, got 'nan'"),
    ("elfs", "beta", "x", "beta must be a finite real number, got 'x'"),
    ("css", "nope", "1", "nope: unknown option for method 'css'; its options are: order"),
    ("nope", "k", "1", "unknown method 'nope'"),
])
def test_option_values_that_do_not_parse_are_errors_naming_the_option(method, key, text, message):
    with pytest.raises(ValueError) as e:
        parse_option(method, key, text)
    assert message in str(e.value)


# ----------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two small image data sets of the same size (64 training, 32 test examples), and a run on A."""
    tmp = tmp_path_factory.mktemp("resume_cli")
    full = load_dataset("digits")
    for name, start in (("a", 0), ("b", 500)):
        x, y = full.data[start:start + 96].numpy(), full.labels[start:start + 96].numpy()
        np.savez(tmp / f"{name}.npz", images=x[:64], labels=y[:64], test_images=x[64:], test_labels=y[64:])
    run = tmp / "run"
    assert main(["train", "--out", str(run), *_on(tmp / "a.npz"), "--epochs", "1", "--batch-size", "32",
                 "--width", "8", "--no-progress"]) == 0
    return tmp, run


def _on(path):
    return ["--data", "tensor", "--data-dir", str(path)]


def _fails(argv, capsys, message):
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err, err
    return err


def test_cli_train_on_another_data_set_leaves_the_run_as_it_was(data, capsys):
    tmp, run = data
    before = snapshot(run)
    _fails(["train", "--out", str(run), *_on(tmp / "b.npz"), "--epochs", "1", "--batch-size", "32", "--width", "8",
            "--no-progress"], capsys, "data set: ")
    assert snapshot(run) == before
    # so the run still selects and evaluates against its own data set
    assert main(["select", "--run", str(run), "--method", "css", "--budget", "10", "--out", str(tmp / "c.npz")]) == 0


def test_cli_resume_with_changed_flags_names_each_and_no_resume_starts_afresh(data, capsys, tmp_path):
    tmp, run = data
    shutil.copytree(run, tmp_path / "run")
    run = tmp_path / "run"
    tiny = [*_on(tmp / "a.npz"), "--batch-size", "32", "--width", "8", "--no-progress"]
    err = _fails(["train", "--out", str(run), *tiny, "--epochs", "1", "--lr", "0.01", "--css-on", "backbone"], capsys,
                 "lr: 0.002 in the run, 0.01 now; css_on: projection in the run, backbone now")
    assert "--no-resume" in err
    _fails(["train", "--out", str(run), *tiny, "--epochs", "1", "--width", "16"], capsys, "width: 8 in the run, 16 now")
    assert main(["train", "--out", str(run), *tiny, "--epochs", "2"]) == 0  # raised: continues
    _fails(["train", "--out", str(run), *tiny, "--epochs", "1"], capsys, "epochs: 2 already trained, 1 now")
    assert main(["train", "--out", str(run), *tiny, "--epochs", "1", "--lr", "0.01", "--no-resume"]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["lr"] == 0.01 and config["train"]["epochs"] == 1
    assert read_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 1


def test_cli_evaluate_refuses_a_run_of_another_data_set_with_as_many_rows(data, capsys):
    tmp, run = data
    Selection(torch.arange(10), "random", dataset_size=64).save(tmp / "plain.npz")  # no fingerprint recorded
    fp_a = ArrayDataset(torch.from_numpy(np.load(tmp / "a.npz")["images"]),
                        torch.from_numpy(np.load(tmp / "a.npz")["labels"])).fingerprint
    err = _fails(["evaluate", "--run", str(run), *_on(tmp / "b.npz"), "--selection", str(tmp / "plain.npz"),
                  "--no-random", "--seeds", "1", "--out", str(tmp / "e")], capsys, "was trained on data set " + fp_a)
    assert "b.npz" in err or "tensor" in err
    assert not (tmp / "e").exists()


def test_cli_evaluate_keys_rows_by_method_and_options(data, capsys):
    tmp, run = data
    fp = json.loads((run / "config.json").read_text())["data"]["fingerprint"]
    g = torch.Generator().manual_seed(0)
    for name, options, seed in (("plain", {}, 0), ("fl", {"objective": "facility_location"}, 0), ("seed1", {}, 1)):
        idx = torch.randperm(64, generator=g)[:16]
        Selection(idx, "sas", options, dataset_size=64, seed=seed, fingerprint=fp).save(tmp / f"sas_{name}.npz")
    out = tmp / "rows"
    assert main(["evaluate", "--run", str(run), *_on(tmp / "a.npz"), "--selection", str(tmp / "sas_plain.npz"),
                 str(tmp / "sas_fl.npz"), str(tmp / "sas_seed1.npz"), "--seeds", "1", "--no-random",
                 "--out", str(out)]) == 0
    summary = {r["method"]: int(r["n"]) for r in csv.DictReader((out / "summary.csv").open())}
    # the two plain sas selections (seeds 0 and 1) share a row; the facility-location one has its own
    assert summary == {"sas": 2, "sas[objective=facility_location]": 1}
    # the same selection twice is not two seeds
    _fails(["evaluate", "--run", str(run), *_on(tmp / "a.npz"), "--selection", str(tmp / "sas_plain.npz"),
            str(tmp / "sas_plain.npz"), "--seeds", "1", "--no-random", "--out", str(out)], capsys,
           "#1 and #2 (in the order given) are both sas with seed 0")


def test_selection_labels_and_what_they_refuse():
    def sel(method, options=None, seed=0, k=5):
        return Selection(torch.arange(k), method, options or {}, dataset_size=20, seed=seed)

    assert selection_labels([sel("css"), sel("css", seed=1)]) == ["css", "css"]
    assert selection_labels([sel("sas", {"n_clusters": 10}), sel("sas", {"n_clusters": 20})]) == \
        ["sas[n_clusters=10]", "sas[n_clusters=20]"]
    assert selection_labels([sel("kcenter", {"normalize": False}), sel("kcenter")]) == \
        ["kcenter[normalize=false]", "kcenter"]
    ds = ArrayDataset(torch.rand(20, 3))
    with pytest.raises(ValueError, match="#1 and #2 .* both css with seed 0 and 5 examples"):
        list(subsets_to_evaluate([sel("css"), sel("css")], ds, (0,), random_baseline=False))
    assert len(list(subsets_to_evaluate([sel("css"), sel("css", k=6)], ds, (0,), random_baseline=False))) == 2
    with pytest.raises(ValueError, match="random selection, whose row would merge with the random baseline"):
        list(subsets_to_evaluate([sel("random")], ds, (0,), random_baseline=True))


@pytest.mark.parametrize("argv,message", [
    (["select", "--run", "{run}", "--method", "css", "--by-class", "--budget", "5", "--out", "{tmp}/x.npz"],
     "--by-class: method 'css' has no per-class mode"),
    (["select", "--run", "{run}", "--method", "balanced_random", "--by-class", "--option", "by=cluster",
      "--budget", "5", "--out", "{tmp}/x.npz"], "--by-class: contradicts --option by=cluster"),
    (["select", "--run", "{run}", "--method", "kcenter", "--option", "normalize=False", "--option",
      "normalize=True", "--budget", "5", "--out", "{tmp}/x.npz"], "--option: normalize given twice"),
    (["select", "--run", "{run}", "--method", "kcenter", "--option", "normalize=no", "--budget", "5",
      "--out", "{tmp}/x.npz"], "normalize must be a bool"),
    (["select", "--run", "{run}", "--method", "prototypes", "--option", "n_clusters=many", "--budget", "5",
      "--out", "{tmp}/x.npz"], "n_clusters must be an int, got 'many'"),
    (["select", "--run", "{run}", "--method", "css", "--budget", "5", "--out", ""], "argument --out: expected a path"),
    (["train", "--out", "", "--epochs", "1"], "argument --out: expected a path"),
    (["evaluate", "--selection", "{tmp}/c.npz", "--out", ""], "argument --out: expected a path"),
    (["demo", "--out", "{tmp}/d", "--fractions", ""], "argument --fractions: expected comma-separated fractions"),
    (["demo", "--out", "{tmp}/d", "--fractions", "0.1,1.5"], "argument --fractions"),
    (["evaluate", "--protocol", "ssl", "--run", "{run}", "--selection", "{tmp}/c.npz", "--out", "{tmp}/e2"],
     "--evaluator/--run: they apply to --protocol coreset"),
    (["evaluate", "--selection", "{tmp}/c.npz", "--out", "{tmp}/e2"], "the probe evaluator needs a training run"),
    (["train", "--out", "{tmp}/t", "--device", "tpu"], "device must be 'auto', 'cpu', 'cuda'"),
    (["train", "--out", "{tmp}/t", "--width", "100000000"], "width must be an int in [1, 1024]"),
    (["train", "--out", "{tmp}/t", "--method", "moco", "--queue-size", "1000000000000"], "queue_size must be"),
    (["train", "--out", "{tmp}/t", "--lr", "nan"], "lr must be a real number >= 0, got nan"),
])
def test_cli_arguments_that_cannot_be_honoured_are_errors(data, argv, message, capsys):
    tmp, run = data
    if not (tmp / "c.npz").is_file():
        Selection(torch.arange(10), "css", dataset_size=64).save(tmp / "c.npz")
    _fails([a.format(run=run, tmp=tmp) for a in argv], capsys, message)
    assert not any((tmp / name).exists() for name in ("x.npz", "d", "e2", "t"))  # nothing written


def test_cli_strict_bool_option_reaches_the_selection(data):
    tmp, run = data
    assert main(["select", "--run", str(run), "--method", "kcenter", "--option", "normalize=False", "--budget", "5",
                 "--out", str(tmp / "k.npz")]) == 0
    assert Selection.load(tmp / "k.npz").options == {"normalize": False}


def test_an_error_without_a_message_still_says_what_it_was(monkeypatch, capsys):
    import coreset_ext.cli as cli

    def fail(args):
        raise EOFError()

    monkeypatch.setattr(cli, "_cmd_info", fail)
    assert cli.main(["info"]) == 2
    assert capsys.readouterr().err == "coreset-ext info: error: EOFError\n"
