"""train.py end to end on tiny data: run folders, determinism, resume, checkpoints, k-fold,
refit, no-validation runs and the training options."""
import contextlib
import json
import logging
import math
import os
import random
import re
import shlex
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

import inference
import train
from config import default_config, parse_config
from conftest import training_images_logged
from dataset import FACE_COLUMNS, DataError, MASK_FILES, NUM_CLASSES, PROB_COLUMNS, age_band, build_transform, encode_class, make_dataset
from make_sample_data import make_sample_dataset
from model import class_probabilities, create_model

TIMING = ["train_images_per_s", "train_seconds", "valid_images_per_s"]
N_PEOPLE = 18
RUN_FILES = ["config.json", "train.log", "split.csv", "metrics.csv", "best.pt", "last.pt", "valid_probs.csv",
             "summary.json"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Its own copy of the tiny dataset (18 people, 126 images) and a shared image cache."""
    root = tmp_path_factory.mktemp("train_data")
    make_sample_dataset(root / "sample", n_train_people=N_PEOPLE, n_eval_people=6, size=(48, 64), seed=0)
    return root


def make_cfg(data, model_dir, **overrides):
    cfg = default_config("train")
    cfg.update(data_dir=str(data / "sample" / "train"), model="basemodel", pretrained=False, weights="",
               resize=[32, 24], epochs=1, batch_size=16, valid_batch_size=32, num_workers=0,
               cache_dir=str(data / "cache"), model_dir=str(model_dir), output_dir="", overwrite=False, resume="",
               val_ratio=0.34, fold="0", extra_data=[], log_interval=1000, device="cpu", name="exp")
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def base_run(data, tmp_path_factory):
    """One finished 1-epoch run, shared by the read-only tests below."""
    cfg = make_cfg(data, tmp_path_factory.mktemp("base_runs"))
    run_dir, summaries = train.main(cfg)
    return run_dir, cfg, summaries


@pytest.fixture(scope="module")
def kfold_run(data, tmp_path_factory):
    """fold='all' with val_ratio 0.5 (two folds) and a refit on everybody."""
    cfg = make_cfg(data, tmp_path_factory.mktemp("kfold_runs"), val_ratio=0.5, fold="all", refit=True,
                   name="kfold")
    run_dir, summaries = train.main(cfg)
    return run_dir, cfg, summaries


def all_training_images(data):
    return sorted(str(p) for p in (data / "sample" / "train" / "images").glob("*/*.jpg"))


def true_label(path):
    """The 18-class label of a sample image from its folder name and file stem."""
    path = Path(path)
    _, gender, _, age = path.parent.name.split("_")
    return int(encode_class(MASK_FILES[path.stem], {"male": 0, "female": 1}[gender], age_band(int(age))))


def metrics_without_timing(run_dir):
    return pd.read_csv(Path(run_dir) / "metrics.csv").drop(columns=TIMING)


def model_state(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------------------------------
# Run folder
def test_run_folder_is_complete(base_run, data):
    run_dir, cfg, summaries = base_run
    assert run_dir == Path(cfg["model_dir"]) / "exp"
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "config.json").read_text()) == cfg

    split = pd.read_csv(run_dir / "split.csv", dtype={"id": str})
    assert len(split) == N_PEOPLE and split["id"].is_unique
    assert set(split.columns) >= {"id", "gender", "age", "age_band", "fold"}
    assert set(split["fold"]) == {0, 1, 2}  # round(1 / 0.34) = 3 folds

    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert len(metrics) == cfg["epochs"] == 1
    assert metrics["epoch"].tolist() == [1]
    for column in ["lr", "train_loss", "train_mask", "train_gender", "train_age", "valid_f1", "valid_accuracy",
                   "valid_mask_f1", "valid_gender_f1", "valid_age_f1", *TIMING]:
        assert column in metrics.columns, column
        assert np.isfinite(metrics[column]).all(), column
    assert math.isclose(metrics.loc[0, "train_loss"],
                        metrics.loc[0, ["train_mask", "train_gender", "train_age"]].sum(), rel_tol=1e-5)

    probs = pd.read_csv(run_dir / "valid_probs.csv")
    assert list(probs.columns) == ["image_path", *[f"p{c}" for c in range(NUM_CLASSES)], "pred", "label"]
    valid_people = set(split.loc[split["fold"] == 0, "id"])
    assert len(probs) == 7 * len(valid_people)
    assert {Path(p).parent.name.split("_")[0] for p in probs["image_path"]} == valid_people
    p = probs[[f"p{c}" for c in range(NUM_CLASSES)]].to_numpy()
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-5)
    np.testing.assert_array_equal(probs["pred"], p.argmax(1))
    assert probs["label"].tolist() == [true_label(path) for path in probs["image_path"]]
    accuracy = (probs["pred"] == probs["label"]).mean()
    assert math.isclose(metrics.loc[0, "valid_accuracy"], accuracy)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_epoch"] == 1 and summary["epochs_run"] == 1
    assert math.isclose(summary["best_valid_f1"], metrics.loc[0, "valid_f1"])
    assert summaries == {0: summary}

    log_text = (run_dir / "train.log").read_text()
    assert "epoch 1: train loss" in log_text and "18-class confusion" in log_text
    assert training_images_logged(run_dir) == (7 * (N_PEOPLE - len(valid_people)), N_PEOPLE - len(valid_people), 0)


def test_the_logged_command_can_be_pasted_back(data, tmp_path, monkeypatch):
    argv = ["train.py", "--cache_dir", "", "--name", "two words"]
    monkeypatch.setattr(sys, "argv", argv)
    run_dir, _ = train.main(make_cfg(data, tmp_path / "runs"))
    assert shlex.split(re.search(r"command: (.*)", (run_dir / "train.log").read_text()).group(1)) == argv


def test_checkpoints_load_with_weights_only(base_run):
    run_dir = base_run[0]
    best = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    last = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    assert best["epoch"] == last["epoch"] == 1
    assert best["config"]["model"] == "basemodel"
    assert {"optimizer", "scheduler", "state", "rng"} <= set(last)
    assert last["state"]["epoch"] == 1 and len(last["state"]["history"]) == 1
    assert_same_state(best["model"], last["model"])  # one epoch: the last is the best


def test_checkpoint_round_trip_gives_the_trained_predictions(base_run):
    run_dir = base_run[0]
    loaded, cfg = inference.load_model(run_dir / "best.pt", "cpu")
    assert not loaded.training
    ckpt = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    fresh = create_model(ckpt["config"], pretrained=False)
    fresh.load_state_dict(ckpt["model"])
    fresh.eval()
    x = torch.randn(4, 3, 32, 24)
    with torch.no_grad():
        a, b = loaded(x), fresh(x)
    assert a.keys() == b.keys() == {"mask", "gender", "age"}
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    # the loaded model reproduces the validation probabilities written during training
    table = pd.read_csv(run_dir / "valid_probs.csv")
    sample, normalize = build_transform("plain", cfg["resize"], cfg["mean"], cfg["std"])
    dataset = make_dataset(table.assign(label=table["label"]), {**cfg, "cache_dir": ""}, sample)
    probs = train.predict(loaded, DataLoader(dataset, batch_size=64), torch.device("cpu"), preprocess=normalize)
    np.testing.assert_allclose(probs, table[[f"p{c}" for c in range(NUM_CLASSES)]].to_numpy(), atol=1e-5)


def test_same_name_goes_to_a_new_folder(data, tmp_path):
    cfg = make_cfg(data, tmp_path / "runs", name="same")
    first, _ = train.main(cfg)
    second, _ = train.main(cfg)
    assert first == tmp_path / "runs" / "same"
    assert second == tmp_path / "runs" / "same2"
    assert (first / "best.pt").is_file() and (second / "best.pt").is_file()
    assert json.loads((first / "config.json").read_text())["name"] == "same"


def test_output_dir_not_empty_is_refused_without_overwrite(data, tmp_path):
    out = tmp_path / "exact"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    cfg = make_cfg(data, tmp_path / "runs", output_dir=str(out))
    with pytest.raises(SystemExit, match="--overwrite"):
        train.main(cfg)
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    with pytest.raises(SystemExit, match="not a run folder"):  # --overwrite only replaces a run
        train.main({**cfg, "overwrite": True})
    assert (out / "old.txt").read_text() == "keep me"
    assert not (tmp_path / "runs").exists()  # an exact output_dir never touches model_dir
    empty = tmp_path / "empty"
    empty.mkdir()
    run_dir, _ = train.main({**cfg, "output_dir": str(empty)})
    assert run_dir == empty and (empty / "metrics.csv").is_file()


def test_overwrite_replaces_an_old_run_instead_of_resuming_it(data, tmp_path):
    cfg = make_cfg(data, tmp_path / "runs", output_dir=str(tmp_path / "exact"))
    run_dir, _ = train.main(cfg)
    (run_dir / "stale.txt").write_text("from the old run")
    run_dir, _ = train.main({**cfg, "overwrite": True, "epochs": 2})
    assert pd.read_csv(run_dir / "metrics.csv")["epoch"].tolist() == [1, 2]
    assert "resuming" not in (run_dir / "train.log").read_text()  # from scratch, not from the old last.pt
    assert not (run_dir / "stale.txt").exists()


def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(data, tmp_path, monkeypatch):
    """Bad data, or Ctrl-C before the first checkpoint: the old run is put back as it was. Once
    the new run has a checkpoint, the old one is deleted even if the new one then stops."""
    cfg = make_cfg(data, tmp_path / "runs", output_dir=str(tmp_path / "exact"))
    run_dir, _ = train.main(cfg)
    old_files = sorted(p.name for p in run_dir.iterdir())
    with pytest.raises(SystemExit, match="nowhere: no such folder"):
        train.main({**cfg, "overwrite": True, "data_dir": str(tmp_path / "nowhere")})
    assert sorted(p.name for p in run_dir.iterdir()) == old_files and not train.replaced_run(run_dir).exists()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train_one_epoch", interrupted)
    with pytest.raises(SystemExit):
        train.main({**cfg, "overwrite": True})
    assert sorted(p.name for p in run_dir.iterdir()) == old_files and not train.replaced_run(run_dir).exists()
    monkeypatch.undo()

    real, calls = train.train_one_epoch, []

    def second_epoch_interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", second_epoch_interrupted)
    with pytest.raises(SystemExit):
        train.main({**cfg, "overwrite": True, "epochs": 2})
    monkeypatch.undo()
    assert not train.replaced_run(run_dir).exists() and (run_dir / "last.pt").is_file()
    assert "replaces is kept in" in (run_dir / "train.log").read_text()
    train.main({**default_config("train"), "resume": str(run_dir), "num_workers": 0, "device": "cpu"})
    assert pd.read_csv(run_dir / "metrics.csv")["epoch"].tolist() == [1, 2]


def test_overwrite_through_a_symlinked_run_folder_is_refused(data, tmp_path):
    """Moving the link aside would leave the old run behind it and make the link a real folder."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    cfg = make_cfg(data, tmp_path / "runs", output_dir=str(tmp_path / "link"))
    train.main(cfg)
    with pytest.raises(SystemExit, match="link is a symbolic link; give the folder it points to"):
        train.main({**cfg, "overwrite": True})
    run_dir, _ = train.main({**cfg, "output_dir": str(tmp_path / "real"), "overwrite": True, "epochs": 2})
    assert pd.read_csv(run_dir / "metrics.csv")["epoch"].tolist() == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # no .replaced left


def test_a_resumed_run_keeps_its_saved_device(base_run, tmp_path, monkeypatch):
    run_dir, _, _ = base_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    asked = []
    monkeypatch.setattr(train, "resolve_device", lambda name: asked.append(name) or torch.device("cpu"))
    train.main({**default_config("train"), "resume": str(copy), "num_workers": 0})
    assert asked == ["cpu"]  # the run's, not args.json's "auto"


def test_overwrite_never_deletes_a_folder_that_only_holds_a_config_file(data, tmp_path):
    """A user's own folder with their --config file named config.json is not a run."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.json").write_text("{}")
    (project / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="not a run folder"):
        train.main(make_cfg(data, tmp_path / "runs", output_dir=str(project), overwrite=True))
    assert sorted(p.name for p in project.iterdir()) == ["config.json", "notes.txt"]


@pytest.mark.parametrize("setting, message", [
    (dict(epochs=0), "--epochs must be at least 1, got 0"),
    (dict(batch_size=0), "--batch_size must be at least 1"),
    (dict(valid_batch_size=0), "--valid_batch_size must be at least 1"),
    (dict(seed=-1), "--seed must be at least 0"),
    (dict(log_interval=0), "--log_interval must be at least 1, got 0"),
    (dict(lr=-1.0), "--lr must be above 0"),
    (dict(ema_decay=1.0), "--ema_decay must be at least 0 and below 1, got 1.0"),
    (dict(label_smoothing=1.5), "--label_smoothing must be at least 0 and below 1, got 1.5"),
    (dict(age_smoothing=-0.1), "--age_smoothing must be at least 0 and at most 1"),
    (dict(dropout=1.0), "--dropout must be at least 0 and below 1"),
    (dict(mix_prob=1.2), "--mix_prob must be at least 0 and at most 1"),
    (dict(momentum=-0.5), "--momentum must be at least 0"),
    (dict(age_sigma=-3.0), "--age_sigma must be at least 0, got -3.0"),
    (dict(lr_decay_step=0), "--lr_decay_step must be at least 1"),
    (dict(age_weight=-1.0), "--age_weight must be at least 0"),
    (dict(cache_workers=-2), "--cache_workers must be at least -1, got -2"),
    (dict(refit=True, val_ratio=0.0), "--refit trains once more .* with --val_ratio 0 .*: drop --refit"),
    (dict(overwrite=True), r"--overwrite replaces the run in --output_dir, and none was given .*exp2.*--output_dir .*exp"),
    (dict(device="cuda:0" if not torch.cuda.is_available() else "tpu"), "--device"),
])
def test_settings_that_cannot_work_are_refused_before_a_run_folder_is_made(data, tmp_path, setting, message):
    with pytest.raises(SystemExit, match=message):
        train.main(make_cfg(data, tmp_path / "runs", **setting))
    assert not (tmp_path / "runs").exists()


def test_drop_ages_that_leave_no_training_image_are_an_error_and_leave_no_run(data, tmp_path):
    with pytest.raises(SystemExit, match="no training images left for fold 0"):
        train.main(make_cfg(data, tmp_path / "runs", drop_ages=list(range(0, 101))))
    assert not list((tmp_path / "runs").iterdir())


def test_a_run_that_diverges_stops_and_keeps_the_epochs_before(data, tmp_path, monkeypatch):
    """Weights turned NaN in epoch 2 (as a far too high learning rate does) stop the run with a
    message; epoch 1's checkpoints stay, and inference refuses a checkpoint with such weights."""
    real = train.train_one_epoch

    def diverging(model, *args, **kwargs):
        stats = real(model, *args, **kwargs)
        if args[-2] == 1:  # epoch index 1: the second epoch
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        return stats
    monkeypatch.setattr(train, "train_one_epoch", diverging)
    with pytest.raises(SystemExit, match=r"diverged in epoch 2: its weights are no longer finite .*lower --lr \(this run: 0.001\)"):
        train.main(make_cfg(data, tmp_path, output_dir=str(tmp_path / "run"), epochs=3))
    for name in ("best.pt", "last.pt"):
        assert torch.load(tmp_path / "run" / name, weights_only=True)["epoch"] == 1
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    next(iter(ckpt["model"].values())).fill_(float("nan"))
    torch.save(ckpt, tmp_path / "nan.pt")
    with pytest.raises(DataError, match=r"nan.pt: its weights are not all finite numbers"):
        inference.load_model(tmp_path / "nan.pt", "cpu")


class FakeTracker:
    """Stands in for a TensorBoard SummaryWriter and a W&B run: records what the run logs."""
    made = []

    def __init__(self, log_dir=None, **kwargs):
        self.log_dir, self.kwargs, self.scalars, self.rows, self.summary, self.closed = log_dir, kwargs, [], [], {}, False
        FakeTracker.made.append(self)

    def add_scalar(self, key, value, step):
        self.scalars.append((key, value, step))

    def log(self, row, step, commit=None):
        self.rows.append((step, dict(row), commit))

    def close(self):
        self.closed = True

    def finish(self, exit_code=0):
        self.closed, self.exit_code = True, exit_code


def fake_wandb(monkeypatch, init=None, login=None):
    wandb = type(sys)("wandb")
    wandb.init = init or (lambda **kwargs: FakeTracker(**kwargs))
    wandb.login = login or (lambda: True)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.delenv("WANDB_MODE", raising=False)


def test_metrics_go_to_tensorboard_when_it_is_installed(data, tmp_path, monkeypatch):
    FakeTracker.made = []
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", type(sys)("torch.utils.tensorboard"))
    sys.modules["torch.utils.tensorboard"].SummaryWriter = FakeTracker
    run_dir, _ = train.main(make_cfg(data, tmp_path, epochs=2))
    [writer] = FakeTracker.made
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert Path(writer.log_dir) == run_dir / "tensorboard" and writer.closed
    assert [(step, value) for key, value, step in writer.scalars if key == "valid_f1"] == \
        list(zip(metrics["epoch"], metrics["valid_f1"]))


def test_wandb_logs_each_model_of_a_run_as_its_own_run_in_one_group(data, tmp_path, monkeypatch):
    FakeTracker.made = []
    ids = iter(["id0", "id1", "id2"])
    monkeypatch.setattr(train.secrets, "token_hex", lambda n: next(ids))
    fake_wandb(monkeypatch)
    run_dir, _ = train.main(make_cfg(data, tmp_path, fold="all", val_ratio=0.5, wandb_project="masks", name="kf"))
    assert [r.kwargs["name"] for r in FakeTracker.made] == ["kf/fold0", "kf/fold1"]
    for k, run in enumerate(FakeTracker.made):
        assert run.kwargs["project"] == "masks" and run.kwargs["group"] == "kf" and run.kwargs["id"] == f"id{k}"
        assert run.kwargs["config"]["wandb_project"] == "masks" and run.kwargs["resume"] == "allow"
        assert (run_dir / f"fold{k}" / "wandb_id.txt").read_text() == f"id{k}" and run.closed and run.exit_code == 0
        # committed at once: W&B holds back a row logged with a step and no commit, and writes it at
        # finish, after the summary, whose best-epoch values it would then replace
        assert [(step, commit) for step, _, commit in run.rows] == [(1, True)]
        assert run.rows[0][1]["valid_f1"] == run.summary["best_valid_f1"]
    # a resumed model continues its W&B run: the id comes from the folder, not a new one
    again = train.wandb_run({**make_cfg(data, tmp_path), "wandb_project": "masks"}, run_dir / "fold1")
    assert again.kwargs["id"] == "id1" and again.kwargs["name"] == "kf/fold1"


def test_wandb_without_the_package_is_refused_before_a_run_folder_is_made(data, tmp_path, monkeypatch):
    fake_wandb(monkeypatch)
    logged_run, _ = train.main(make_cfg(data, tmp_path / "logged", wandb_project="masks"))
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(SystemExit, match="--wandb_project needs the wandb package: pip install wandb"):
        train.main(make_cfg(data, tmp_path / "runs", wandb_project="masks"))
    assert not (tmp_path / "runs").exists()
    with pytest.raises(SystemExit, match="--wandb_project needs the wandb package"):  # its saved config has it
        train.main(make_cfg(data, tmp_path, resume=str(logged_run)), given={"resume"})
    train.main(make_cfg(data, tmp_path, resume=str(logged_run), wandb_project=""), given={"resume", "wandb_project"})


def test_a_wandb_failure_warns_and_the_training_goes_on(data, tmp_path, monkeypatch, capsys):
    """No login or no network (wandb.init raises) must not cost a training; a run that stops tells
    W&B how it ended before its folder is settled."""
    def no_login(**kwargs):
        raise RuntimeError("No API key configured. Use `wandb login` to log to W&B.")
    fake_wandb(monkeypatch, init=no_login)
    run_dir, _ = train.main(make_cfg(data, tmp_path, wandb_project="masks", name="offline"))
    assert (run_dir / "summary.json").is_file()
    assert "W&B is not logging" in capsys.readouterr().out

    class GoneAway(FakeTracker):  # W&B's service gone mid-training
        def log(self, row, step, commit=None):
            raise ConnectionError("service is gone")

        def finish(self, exit_code=0):
            raise ConnectionError("service is gone")
    fake_wandb(monkeypatch, init=lambda **kwargs: GoneAway(**kwargs))
    run_dir, _ = train.main(make_cfg(data, tmp_path, wandb_project="masks", name="gone", epochs=2))
    out = capsys.readouterr().out
    assert (run_dir / "summary.json").is_file() and "W&B did not take epoch 2: ConnectionError" in out
    assert "W&B did not close its run" in out
    for stop, code in ((KeyboardInterrupt, 130), (train.Terminated, 143), (RuntimeError, 1)):
        FakeTracker.made = []
        fake_wandb(monkeypatch)
        monkeypatch.setattr(train, "check_not_diverged", lambda *args: (_ for _ in ()).throw(stop))
        with pytest.raises((SystemExit, RuntimeError)):
            train.main(make_cfg(data, tmp_path, wandb_project="masks", name="stopped"))
        [run] = FakeTracker.made
        assert run.closed and run.exit_code == code


def test_a_wandb_that_does_not_import_is_named_before_a_run_folder_is_made(data, tmp_path, monkeypatch):
    class Broken:  # an installed wandb whose own imports fail (e.g. a protobuf clash) raises other errors
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name == "wandb":
                raise TypeError("Descriptors cannot be created directly")
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Broken, *sys.meta_path])
    with pytest.raises(SystemExit, match=r"the wandb package does not import \(TypeError: Descriptors cannot"):
        train.main(make_cfg(data, tmp_path / "runs", wandb_project="masks"))
    assert not (tmp_path / "runs").exists()


def test_wandb_login_is_settled_before_a_run_folder_is_made(data, tmp_path, monkeypatch):
    """Without a key, wandb would stop at its login menu after the data is loaded, for each model."""
    def no_key():
        raise RuntimeError("No API key configured. Use `wandb login` to log in.")
    fake_wandb(monkeypatch, login=no_key)
    with pytest.raises(SystemExit, match=r"W&B login failed \(RuntimeError: No API key configured.*WANDB_MODE=offline"):
        train.main(make_cfg(data, tmp_path / "runs", wandb_project="masks"))
    assert not (tmp_path / "runs").exists()
    monkeypatch.setenv("WANDB_MODE", "offline")  # no login needed: the logs stay on this machine
    run_dir, _ = train.main(make_cfg(data, tmp_path / "runs", wandb_project="masks"))
    assert (run_dir / "summary.json").is_file()


def test_a_damaged_last_checkpoint_or_config_is_named_on_resume(base_run, tmp_path):
    run_dir, _, _ = base_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("summary.json"))
    (copy / "last.pt").write_bytes((copy / "last.pt").read_bytes()[:1000])
    resume_cfg = {**default_config("train"), "resume": str(copy), "num_workers": 0, "device": "cpu"}
    with pytest.raises(SystemExit, match=f"{copy / 'last.pt'}: not a readable checkpoint"):
        train.main(resume_cfg)
    (copy / "config.json").write_text("{")
    with pytest.raises(SystemExit, match="config.json: not valid JSON"):
        train.main(resume_cfg)


def test_an_interrupted_checkpoint_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    def cut_short(obj, path):
        Path(path).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", cut_short)
    with pytest.raises(KeyboardInterrupt):
        train.save_atomic({"a": 1}, tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.assign(x1=t["x1"].astype(object).where(t.index != 3, "abc")), r"line\(s\) \[5\]: found must be 0 or 1"),
    (lambda t: t.assign(found=t["found"].where(t.index != 0, 2)), r"line\(s\) \[2\]"),
    (lambda t: t.assign(x2=t["x2"].where(t.index != 1, 1.0)), r"line\(s\) \[3\]: .*x1 < x2"),
    (lambda t: t.assign(width=t["width"].where(t.index != 0, 0)), r"line\(s\) \[2\]: .*width and height above 0"),
    (lambda t: pd.concat([t, t.iloc[[4]]]), "listed more than once"),
    (lambda t: pd.concat([t, t.iloc[[4]].assign(image="images/gone/normal.jpg")]), "1 row\\(s\\) for images not in"),
])
def test_a_damaged_faces_csv_is_an_error_naming_its_line_and_the_old_run_stays(data, tmp_path, damage, message):
    train_dir = tmp_path / "train"
    shutil.copytree(data / "sample" / "train", train_dir)
    rows = [{"image": p.relative_to(train_dir).as_posix(), "width": 48, "height": 64, "found": 1, "score": 0.99,
             "x1": 6.0, "y1": 8.0, "x2": 40.0, "y2": 50.0} for p in sorted(train_dir.glob("images/*/*.jpg"))]
    rows[6] = {key: rows[6][key] for key in ("image", "width", "height")} | {"found": 0}  # no face found
    faces = pd.DataFrame(rows).reindex(columns=FACE_COLUMNS)
    faces.to_csv(train_dir / "faces.csv", index=False)
    cfg = make_cfg(data, tmp_path / "runs", data_dir=str(train_dir), face_crop=True, cache_dir="",
                   output_dir=str(tmp_path / "run"))
    run_dir, _ = train.main(cfg)
    damage(faces).to_csv(train_dir / "faces.csv", index=False)
    with pytest.raises(SystemExit, match=message):
        train.main({**cfg, "overwrite": True})
    assert (run_dir / "summary.json").is_file() and not train.replaced_run(run_dir).exists()


def test_same_seed_repeats_the_run_exactly(data, tmp_path):
    """Two runs with one seed give the same metrics and weights, the first with a cold image
    cache and the second reusing it; another seed gives another run."""
    cfg = make_cfg(data, tmp_path / "runs", cache_dir=str(tmp_path / "cold_cache"))
    first, _ = train.main(cfg)
    second, _ = train.main(cfg)
    pd.testing.assert_frame_equal(metrics_without_timing(first), metrics_without_timing(second), check_exact=True)
    assert_same_state(model_state(first / "best.pt"), model_state(second / "best.pt"))
    other, _ = train.main({**cfg, "seed": 7})
    assert metrics_without_timing(other)["train_loss"][0] != metrics_without_timing(first)["train_loss"][0]


class _StopAfter:
    """A loader that raises KeyboardInterrupt after `batches` batches (Ctrl-C mid-epoch)."""

    def __init__(self, loader, batches):
        self.loader, self.batches = loader, batches

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for i, item in enumerate(self.loader):
            if i == self.batches:
                raise KeyboardInterrupt
            yield item


@pytest.mark.parametrize("cache_workers, ema_decay", [(0, 0.0), (2, 0.0), (0, 0.9)])
def test_resume_after_interruption_matches_an_uninterrupted_run(data, tmp_path, monkeypatch, cache_workers, ema_decay):
    """Also with cached batches read by worker processes: the plain resume command keeps the
    run's worker counts (another count would change the augmentation stream); and with a weight
    average, which continues from last.pt's average while the optimizer continues the trained weights."""
    full, _ = train.main(make_cfg(data, tmp_path / "runs", epochs=2, name="full", cache_workers=cache_workers,
                                  ema_decay=ema_decay))

    real, calls = train.train_one_epoch, []

    def interrupted(model, loader, *args, **kwargs):
        calls.append(1)
        # epoch 2: one optimizer step, then Ctrl-C (that step must not reach any checkpoint)
        return real(model, _StopAfter(loader, 1) if len(calls) == 2 else loader, *args, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", interrupted)
    cut_cfg = make_cfg(data, tmp_path / "runs", epochs=2, name="cut", cache_workers=cache_workers, ema_decay=ema_decay)
    with pytest.raises(SystemExit) as stop:
        train.main(cut_cfg)
    assert stop.value.code == 130
    cut = tmp_path / "runs" / "cut"
    assert len(calls) == 2
    assert torch.load(cut / "last.pt", map_location="cpu", weights_only=True)["epoch"] == 1
    assert len(pd.read_csv(cut / "metrics.csv")) == 1
    assert not (cut / "summary.json").exists()
    assert "--resume" in (cut / "train.log").read_text()
    monkeypatch.undo()

    resume_cfg = {**default_config("train"), "resume": str(cut), "num_workers": 0, "device": "cpu"}
    with pytest.raises(SystemExit, match=r"it would ignore --epochs 5 \(the run has 2\)"):
        train.main({**resume_cfg, "epochs": 5})
    run_dir, _ = train.main(resume_cfg)
    assert run_dir == cut
    assert "resuming" in (cut / "train.log").read_text()
    resumed, uninterrupted = metrics_without_timing(cut), metrics_without_timing(full)
    assert resumed["epoch"].tolist() == [1, 2]
    pd.testing.assert_frame_equal(resumed, uninterrupted, check_exact=True)
    assert_same_state(model_state(cut / "best.pt"), model_state(full / "best.pt"))
    assert_same_state(model_state(cut / "last.pt"), model_state(full / "last.pt"))
    summaries = [{k: v for k, v in json.loads((d / "summary.json").read_text()).items() if k not in TIMING}
                 for d in (cut, full)]
    assert summaries[0] == summaries[1] and summaries[0]["epochs_run"] == 2


def initial_weights(cfg):
    """The weights fit() starts from: it seeds torch, then creates the model."""
    train.seed_everything(cfg["seed"])
    return create_model(cfg).state_dict()


@pytest.mark.parametrize("ema_decay, average_of", [(1e-9, "trained"), (1 - 1e-9, "initial")])
def test_the_weight_average_is_what_is_validated_saved_and_predicted(data, tmp_path, ema_decay, average_of):
    """A decay near 0 averages nothing (the trained weights), near 1 keeps the starting weights;
    best.pt and last.pt's model hold the average, which inference reproduces the validation with."""
    cfg = make_cfg(data, tmp_path / "runs", epochs=2, ema_decay=ema_decay)
    run_dir, summaries = train.main(cfg)
    # 2 epochs of 5 steps: a decay near 1 keeps the starting weights, which the log warns about
    warned = "of the starting weights in the average" in (run_dir / "train.log").read_text()
    assert warned == (average_of == "initial")
    last = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    trained, initial = last["trained_model"], initial_weights(cfg)
    expected = trained if average_of == "trained" else initial
    other = initial if average_of == "trained" else trained
    changed = [k for k in trained if trained[k].is_floating_point() and (trained[k] - initial[k]).abs().max() > 1e-3]
    assert changed  # training moved the weights, so the two cases differ
    for key in changed:
        torch.testing.assert_close(last["model"][key], expected[key], rtol=0, atol=1e-5)
        assert (last["model"][key] - other[key]).abs().max() > 1e-4, key
    counts = [k for k in trained if k.endswith("num_batches_tracked")]
    assert counts and all(last["model"][k] == trained[k] == 10 for k in counts)  # copied, not averaged
    table = pd.read_csv(run_dir / "valid_probs.csv")  # written with best.pt's weights, the average's
    sample, normalize = build_transform("plain", cfg["resize"], cfg["mean"], cfg["std"])
    dataset = make_dataset(table.assign(label=table["label"]), {**cfg, "cache_dir": ""}, sample)
    model = inference.load_model(run_dir / "best.pt", torch.device("cpu"))[0]
    probs = train.predict(model, DataLoader(dataset, batch_size=64), torch.device("cpu"), preprocess=normalize)
    np.testing.assert_allclose(probs, table[PROB_COLUMNS].to_numpy(), atol=1e-5)


@pytest.mark.parametrize("total_steps", [40, 6000])
def test_a_run_too_short_for_its_decay_is_told_a_decay_that_fits(caplog, total_steps):
    """The suggested decay, as printed, leaves at most 5% of the starting weights and is below 1
    (accepted by --ema_decay), however many steps the run has."""
    with caplog.at_level(logging.WARNING, logger=train.log.name):
        train.weight_average({"ema_decay": 0.9999}, torch.nn.Linear(2, 2), total_steps)
    suggested = float(re.search(r"--ema_decay ([0-9.]+) or lower", caplog.text).group(1))
    assert suggested < 1 and suggested ** total_steps <= 0.05
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=train.log.name):
        train.weight_average({"ema_decay": suggested}, torch.nn.Linear(2, 2), total_steps)
    assert "starting weights" not in caplog.text


def test_resume_refuses_a_setting_given_on_the_command_line_even_at_its_default(base_run):
    """--epochs 6 is args.json's default, but given beside --resume of a 1-epoch run it would be
    ignored: refused. The worker counts given there replace the run's; not given, the run's stay."""
    run_dir, _, _ = base_run
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["epochs"] == 1 and default_config("train")["epochs"] == 6
    cfg, given = parse_config("train", ["--resume", str(run_dir), "--epochs", "6"], with_given=True)
    with pytest.raises(SystemExit, match=r"it would ignore --epochs 6 \(the run has 1\)"):
        train.main(cfg, given)
    cfg, given = parse_config("train", ["--resume", str(run_dir), "--epochs", "1", "--cache_workers", "3"], with_given=True)
    resumed = train.resumed_config(cfg, given, {**saved, "cache_workers": 2, "num_workers": 1})
    assert (resumed["cache_workers"], resumed["num_workers"], resumed["epochs"]) == (3, 1, 1)


def test_resume_of_a_folder_that_is_not_a_run_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="not a run folder"):
        train.main({**default_config("train"), "resume": str(tmp_path), "device": "cpu"})


# ---------------------------------------------------------------------------------------------
# k-fold, refit, no validation
def test_fold_all_writes_every_fold_and_out_of_fold_probabilities(kfold_run, data):
    run_dir, cfg, summaries = kfold_run
    assert set(summaries) == {0, 1}
    split = pd.read_csv(run_dir / "split.csv", dtype={"id": str})
    assert set(split["fold"]) == {0, 1}
    for k in (0, 1):
        fold_dir = run_dir / f"fold{k}"
        for name in ["metrics.csv", "best.pt", "last.pt", "valid_probs.csv", "summary.json"]:
            assert (fold_dir / name).is_file(), f"fold{k}/{name}"
        valid = pd.read_csv(fold_dir / "valid_probs.csv")
        people = {Path(p).parent.name.split("_")[0] for p in valid["image_path"]}
        assert people == set(split.loc[split["fold"] == k, "id"])
    assert not (run_dir / "best.pt").exists()  # the folds hold the models

    oof = pd.read_csv(run_dir / "oof_probs.csv")
    assert oof["image_path"].is_unique
    assert sorted(oof["image_path"]) == all_training_images(data)
    assert oof["label"].tolist() == [true_label(p) for p in oof["image_path"]]
    p = oof[[f"p{c}" for c in range(NUM_CLASSES)]].to_numpy()
    np.testing.assert_array_equal(oof["pred"], p.argmax(1))
    folds = pd.concat([pd.read_csv(run_dir / f"fold{k}" / "valid_probs.csv") for k in (0, 1)], ignore_index=True)
    pd.testing.assert_frame_equal(oof, folds)


def test_a_resumed_refit_keeps_its_epoch_count_and_a_damaged_fold_table_is_named(kfold_run, tmp_path):
    """A refit interrupted before its summary.json resumes with the epochs it started with, even
    where the folds' best epochs now give another count (as an older rounding did); a fold's
    validation table damaged since is named when the out-of-fold table is rebuilt."""
    run_dir = tmp_path / "kfold"
    shutil.copytree(kfold_run[0], run_dir)
    for k, best in ((0, 2), (1, 3)):  # their median rounds to 3, the refit started with 1
        path = run_dir / f"fold{k}" / "summary.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "best_epoch": best}))
    (run_dir / "refit" / "summary.json").unlink()
    resume_cfg = {**default_config("train"), "resume": str(run_dir), "num_workers": 0, "device": "cpu"}
    train.main(resume_cfg)
    assert len(pd.read_csv(run_dir / "refit" / "metrics.csv")) == 1
    assert json.loads((run_dir / "refit" / "summary.json").read_text())["epochs_run"] == 1

    table = run_dir / "fold1" / "valid_probs.csv"
    table.write_text(table.read_text()[:len(table.read_text()) // 2])
    (run_dir / "oof_probs.csv").unlink()
    with pytest.raises(SystemExit, match=f"error: {re.escape(str(table))}: line \\d+: \\d+ fields, but the header has 21"):
        train.main(resume_cfg)


def test_refit_trains_on_everybody(kfold_run):
    run_dir, cfg, summaries = kfold_run
    refit = run_dir / "refit"
    assert (refit / "best.pt").is_file() and (refit / "last.pt").is_file()
    assert not (refit / "valid_probs.csv").exists()
    epochs = train.refit_epochs(summaries.values())
    assert len(pd.read_csv(refit / "metrics.csv")) == epochs
    assert torch.load(refit / "best.pt", map_location="cpu", weights_only=True)["config"]["epochs"] == epochs
    assert training_images_logged(run_dir, refit) == (7 * N_PEOPLE, N_PEOPLE, 0)
    for k in (0, 1):
        assert training_images_logged(run_dir, run_dir / f"fold{k}")[0] < 7 * N_PEOPLE


@pytest.fixture(scope="module")
def pseudo_run(data, tmp_path_factory):
    """A one-fold run with a pseudo-label stage; the threshold lets every eval image through
    (a top probability of 18 classes is at least 1/18)."""
    cfg = make_cfg(data, tmp_path_factory.mktemp("pseudo_runs"), pseudo_threshold=0.05)
    run_dir, summaries = train.main(cfg)
    return run_dir, cfg


def eval_predictions(checkpoints, cfg):
    probs, images = inference.predict_eval(checkpoints, {**cfg, "tta": "flip", "eval_dir": ""}, torch.device("cpu"))
    return probs, images


def test_pseudo_stage_trains_on_everybody_plus_the_labelled_eval_images(pseudo_run, data):
    run_dir, cfg = pseudo_run
    labels = pd.read_csv(run_dir / "pseudo" / "labels.csv")
    probs, images = eval_predictions([run_dir / "best.pt"], cfg)  # the first stage labels the eval images
    assert labels["path"].tolist() == [str(Path(p).resolve()) for p in images["image_path"]]
    np.testing.assert_array_equal(labels["class"], probs.argmax(1))
    n_eval = len(pd.read_csv(data / "sample" / "eval" / "info.csv"))
    assert len(labels) == n_eval
    stage = run_dir / "pseudo"
    assert training_images_logged(run_dir, stage) == (7 * N_PEOPLE + n_eval, N_PEOPLE, n_eval)
    assert training_images_logged(run_dir)[0] < 7 * N_PEOPLE  # the first stage kept its validation fold
    assert len(pd.read_csv(stage / "metrics.csv")) == cfg["epochs"]
    saved = torch.load(stage / "best.pt", map_location="cpu", weights_only=True)["config"]
    assert saved["extra_data"] == [str(run_dir / "pseudo" / "labels.csv")]
    assert not (stage / "valid_probs.csv").exists()


def test_pseudo_stage_leaves_eval_images_given_in_extra_data_to_their_given_labels(pseudo_run, data, tmp_path):
    """Labels from an earlier run (inference.py --pseudo_threshold) passed with --extra_data keep
    their labels; the stage labels only the other eval images (each image once)."""
    run_dir, cfg = pseudo_run
    given = pd.read_csv(run_dir / "pseudo" / "labels.csv").iloc[:10]
    given.to_csv(tmp_path / "given.csv", index=False)
    second, _ = train.main({**cfg, "model_dir": str(tmp_path / "runs"), "extra_data": [str(tmp_path / "given.csv")]})
    labels = pd.read_csv(second / "pseudo" / "labels.csv")
    n_eval = len(pd.read_csv(data / "sample" / "eval" / "info.csv"))
    assert len(labels) == n_eval - 10 and not set(labels["path"]) & set(given["path"])
    assert "10 eval image(s) already in --extra_data" in (second / "train.log").read_text()


def test_soft_pseudo_stage_trains_towards_the_first_stage_probabilities(data, tmp_path, monkeypatch):
    soft_rows = []
    original = train.Criterion.__call__

    def counting(self, outputs, labels, ages, soft=None):
        soft_rows.append(int((~soft[:, 0].isnan()).sum()))
        return original(self, outputs, labels, ages, soft)

    monkeypatch.setattr(train.Criterion, "__call__", counting)
    cfg = make_cfg(data, tmp_path, pseudo_threshold=0.05, pseudo_soft=True, batch_size=8)  # 8 divides 7 * 18 + 42
    run_dir, _ = train.main(cfg)
    labels = pd.read_csv(run_dir / "pseudo" / "labels.csv")
    probs, images = eval_predictions([run_dir / "best.pt"], cfg)
    assert labels["path"].tolist() == [str(Path(p).resolve()) for p in images["image_path"]]
    np.testing.assert_allclose(labels[PROB_COLUMNS].to_numpy(), probs, rtol=1e-5)
    np.testing.assert_array_equal(labels["class"], probs.argmax(1))
    n_eval = len(labels)
    first_stage_steps = len(soft_rows) - (7 * N_PEOPLE + n_eval) // cfg["batch_size"] * cfg["epochs"]
    assert sum(soft_rows[:first_stage_steps]) == 0  # the first stage has no soft targets
    assert sum(soft_rows[first_stage_steps:]) == n_eval * cfg["epochs"]  # the stage sees each eval image once per epoch


def test_inference_blends_the_pseudo_stage_with_the_first_stage(pseudo_run, tmp_path):
    run_dir, cfg = pseudo_run
    predict = {**default_config("inference"), "num_workers": 0, "cache_dir": cfg["cache_dir"], "device": "cpu"}
    assert predict["first_stage_weight"] == 0.5
    inference.main({**predict, "run": [str(run_dir)], "output_dir": str(tmp_path / "blend")})
    inference.main({**predict, "run": [str(run_dir)], "first_stage_weight": 0.0, "output_dir": str(tmp_path / "stage")})
    inference.main({**predict, "run": [str(run_dir / "best.pt")], "output_dir": str(tmp_path / "first")})
    stage, _ = eval_predictions([run_dir / "pseudo" / "best.pt"], cfg)
    first, _ = eval_predictions([run_dir / "best.pt"], cfg)
    assert not np.allclose(stage, first)  # a different model, not the first stage under another name
    for name, probs in [("blend", (stage + first) / 2), ("stage", stage), ("first", first)]:
        np.testing.assert_allclose(pd.read_csv(tmp_path / name / "eval_probs.csv")[PROB_COLUMNS], probs, atol=1e-6)
        np.testing.assert_array_equal(pd.read_csv(tmp_path / name / "submission.csv")["ans"], probs.argmax(1))
    with pytest.raises(SystemExit, match="give --output_dir"):  # would replace the stage's submission in RUN
        inference.main({**predict, "run": [str(run_dir / "best.pt")]})
    with pytest.raises(SystemExit, match="first_stage_weight is a share, 0 to 1; got 1.5"):
        inference.main({**predict, "run": [str(run_dir)], "first_stage_weight": 1.5})


def test_a_pseudo_stage_shares_its_weight_with_every_first_stage_model(tmp_path):
    """A k-fold run's folds share first_stage_weight; with a refit model, the refit model
    (which labelled the eval images) takes it instead."""
    run_dir = tmp_path / "run"
    for folder in ["fold0", "fold1", "pseudo"]:
        (run_dir / folder).mkdir(parents=True)
        (run_dir / folder / "best.pt").touch()
        (run_dir / folder / "summary.json").touch()
    members = inference.run_members(run_dir, "best", 0.4)
    assert members == [(run_dir / "pseudo" / "best.pt", 0.6), (run_dir / "fold0" / "best.pt", 0.2),
                       (run_dir / "fold1" / "best.pt", 0.2)]
    assert inference.run_members(run_dir, "best", 0.0) == [(run_dir / "pseudo" / "best.pt", 1.0)]
    assert inference.run_members(run_dir / "fold1", "best", 0.5) == [(run_dir / "fold1" / "best.pt", 1.0)]
    (run_dir / "refit").mkdir()
    (run_dir / "refit" / "best.pt").touch()
    (run_dir / "refit" / "summary.json").touch()
    assert inference.run_members(run_dir, "best", 0.4) == [(run_dir / "pseudo" / "best.pt", 0.6),
                                                           (run_dir / "refit" / "best.pt", 0.4)]


def test_inference_pseudo_labels_leave_the_stage_labels_alone(pseudo_run):
    """inference.py --pseudo_threshold writes RUN/pseudo_labels.csv; the file the stage trained
    on, RUN/pseudo/labels.csv, is another and stays as it was."""
    run_dir, cfg = pseudo_run
    stage_labels = (run_dir / "pseudo" / "labels.csv").read_bytes()
    inference.main({**default_config("inference"), "run": [str(run_dir)], "pseudo_threshold": 0.05, "num_workers": 0,
                    "cache_dir": cfg["cache_dir"], "device": "cpu"})
    assert (run_dir / "pseudo_labels.csv").is_file()
    assert (run_dir / "pseudo" / "labels.csv").read_bytes() == stage_labels


def test_an_unfinished_pseudo_stage_is_resumed_on_its_saved_labels(pseudo_run, tmp_path):
    run_dir, cfg = pseudo_run
    cut = tmp_path / "cut"
    shutil.copytree(run_dir, cut)
    for name in ["best.pt", "last.pt", "metrics.csv", "summary.json"]:  # interrupted before its first epoch ended
        (cut / "pseudo" / name).unlink()
    with pytest.raises(SystemExit, match="pseudo-label stage .* is not finished.* --run .*cut/best.pt --output_dir DIR"):
        inference.final_stage(cut)
    labels = pd.read_csv(cut / "pseudo" / "labels.csv").head(3)
    labels.to_csv(cut / "pseudo" / "labels.csv", index=False)  # a resumed stage must not label the eval images again
    train.main({**default_config("train"), "resume": str(cut), "num_workers": 0, "device": "cpu"})
    assert training_images_logged(cut, cut / "pseudo") == (7 * N_PEOPLE + 3, N_PEOPLE, 3)
    assert inference.final_stage(cut) == cut / "pseudo"


def test_a_pseudo_threshold_no_eval_image_reaches_stops_with_the_first_stage_kept(data, tmp_path, monkeypatch):
    cfg = make_cfg(data, tmp_path / "runs", pseudo_threshold=0.9, output_dir=str(tmp_path / "run"))
    uniform = lambda checkpoints, cfg, device: (np.full((42, NUM_CLASSES), 1 / NUM_CLASSES), None)  # noqa: E731
    monkeypatch.setattr(inference, "predict_eval", uniform)
    with pytest.raises(SystemExit, match=r"no image of .*eval reaches --pseudo_threshold 0.9 \(the highest top probability is 0.056"):
        train.main(cfg)
    assert (tmp_path / "run" / "best.pt").is_file() and (tmp_path / "run" / "summary.json").is_file()
    assert not (tmp_path / "run" / "pseudo").exists()
    assert "reaches --pseudo_threshold" in (tmp_path / "run" / "train.log").read_text()
    # inference does not pass the missing stage over for the first stage, and says how to ask for that
    inference_cfg = {**default_config("inference"), "device": "cpu", "num_workers": 0, "cache_dir": cfg["cache_dir"]}
    with pytest.raises(SystemExit, match=r"pseudo-label stage .*pseudo of a run trained with --pseudo_threshold was not started; its train.log says why.*"
                                         r"first stage's models alone: python inference.py --run .*run/best.pt --output_dir DIR"):
        inference.main({**inference_cfg, "run": [str(tmp_path / "run")]})
    with pytest.raises(SystemExit, match="give --output_dir: by default the predictions of .*best.pt would replace those "
                                         "of the run .*run, which come from its pseudo-label stage"):
        inference.main({**inference_cfg, "run": [str(tmp_path / "run" / "best.pt")]})
    assert not (tmp_path / "run" / "eval_probs.csv").exists()
    # the way out train.py printed works as printed
    monkeypatch.undo()
    printed = re.search(r"python inference.py (.*) --pseudo_threshold P", (tmp_path / "run" / "train.log").read_text()).group(1)
    argv = printed.replace("DIR", str(tmp_path / "labels")).split() + ["--pseudo_threshold", "0.05"]
    inference.main({**parse_config("inference", argv), "device": "cpu", "num_workers": 0, "cache_dir": cfg["cache_dir"]})
    assert len(pd.read_csv(tmp_path / "labels" / "pseudo_labels.csv")) == 42


@pytest.mark.parametrize("threshold, eval_dir, message", [
    (1.5, "", "is a probability, 0 .* to 1; got 1.5"),
    (-0.1, "", "is a probability"),
    (0.5, "no/such/eval", "eval images, and they cannot be read: .*no/such/eval.*info.csv"),
    (0.5, "FACE_CROP", "eval images, and they cannot be read: .*faces.csv"),
    (0.5, "BAD_IMAGE", "eval images, and they cannot be read: .*unreadable.* but not eval images"),
])
def test_bad_pseudo_settings_are_refused_before_training(data, tmp_path, threshold, eval_dir, message):
    cfg = make_cfg(data, tmp_path / "runs", pseudo_threshold=threshold, eval_dir=eval_dir)
    if eval_dir == "FACE_CROP":  # an eval folder without the faces.csv that face_crop needs
        shutil.copytree(data / "sample" / "eval", tmp_path / "eval", ignore=shutil.ignore_patterns("faces.csv"))
        cfg.update(eval_dir=str(tmp_path / "eval"), face_crop=True)
    if eval_dir == "BAD_IMAGE":  # found before training, not after it
        shutil.copytree(data / "sample" / "eval", tmp_path / "eval")
        next((tmp_path / "eval" / "images").iterdir()).write_bytes(b"not an image")
        cfg.update(eval_dir=str(tmp_path / "eval"), skip_bad_images=True)
    with pytest.raises(SystemExit, match=message):
        train.main(cfg)
    assert not (tmp_path / "runs").exists()


def test_pseudo_stage_of_a_refit_kfold_run_is_labelled_by_the_refit_model(data, tmp_path):
    run_dir, _ = train.main(make_cfg(data, tmp_path / "runs", val_ratio=0.5, fold="all", refit=True,
                                     pseudo_threshold=0.05))
    labels = pd.read_csv(run_dir / "pseudo" / "labels.csv")
    probs, _ = eval_predictions([run_dir / "refit" / "best.pt"], make_cfg(data, tmp_path))
    np.testing.assert_array_equal(labels["class"], probs.argmax(1))
    assert inference.final_stage(run_dir) == run_dir / "pseudo"


def test_resuming_a_run_saved_before_a_key_existed_takes_its_default(base_run, tmp_path):
    run_dir, cfg, _ = base_run
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    saved = json.loads((old / "config.json").read_text())
    for key in ("pseudo_threshold", "eval_dir"):  # keys added to args.json later
        del saved[key]
    (old / "config.json").write_text(json.dumps(saved))
    train.main({**default_config("train"), "resume": str(old), "num_workers": 0, "device": "cpu"})
    assert not (old / "pseudo").exists()


def test_val_ratio_0_trains_on_everybody(data, tmp_path):
    run_dir, summaries = train.main(make_cfg(data, tmp_path / "runs", val_ratio=0.0))
    split = pd.read_csv(run_dir / "split.csv")
    assert len(split) == N_PEOPLE and (split["fold"] == -1).all()
    assert not (run_dir / "valid_probs.csv").exists()
    assert (run_dir / "best.pt").is_file() and (run_dir / "summary.json").is_file()
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert len(metrics) == 1 and not any(c.startswith("valid_") for c in metrics.columns)
    assert summaries[None]["best_epoch"] == 1
    assert training_images_logged(run_dir) == (7 * N_PEOPLE, N_PEOPLE, 0)


# ---------------------------------------------------------------------------------------------
# Options: each trains one tiny epoch
@pytest.fixture(scope="module")
def plain_loss(data, tmp_path_factory):
    run_dir, _ = train.main(make_cfg(data, tmp_path_factory.mktemp("plain_runs")))
    return float(pd.read_csv(run_dir / "metrics.csv")["train_loss"][0])


OPTIONS = {
    "mixup": dict(mix="mixup", mix_prob=1.0),
    "cutmix": dict(mix="cutmix", mix_prob=1.0),
    "vertical_cutmix": dict(mix="vertical_cutmix", mix_prob=1.0),
    "balanced_sampler": dict(balanced_sampler=True),
    "sched_none": dict(scheduler="none"),
    "sched_step": dict(scheduler="step", lr_decay_step=1),
    "sched_cosine": dict(scheduler="cosine"),
    "sched_cosine_restarts": dict(scheduler="cosine_restarts", lr_decay_step=1),
    "SGD": dict(optimizer="SGD", scheduler="none"),
    "Adam": dict(optimizer="Adam", scheduler="none"),
    "focal_single_head": dict(criterion="focal", head="single"),
    "label_smoothing_age_smoothing": dict(criterion="label_smoothing", age_smoothing=0.1),
    "f1_single_head": dict(criterion="f1", head="single"),
    "class_weights": dict(class_weights=True),
    "age_regression_grad_clip": dict(age_regression=0.5, f1_weight=0.2, grad_clip=1.0),
    "strong_augmentation": dict(augmentation="strong"),
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_option_trains_one_epoch(option, data, tmp_path, plain_loss):
    overrides = OPTIONS[option]
    run_dir, _ = train.main(make_cfg(data, tmp_path / "runs", **overrides))
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert len(metrics) == 1
    assert np.isfinite(metrics["train_loss"]).all() and np.isfinite(metrics["valid_f1"]).all()
    expected_lr = 1e-3 / 25 if overrides.get("scheduler", "one_cycle") == "one_cycle" else 1e-3
    assert math.isclose(metrics.loc[0, "lr"], expected_lr, rel_tol=1e-6)
    if "mix" in overrides or "balanced_sampler" in overrides:  # other batches than the plain run
        assert metrics.loc[0, "train_loss"] != plain_loss
    if overrides.get("age_regression"):
        assert np.isfinite(metrics["train_age_value"]).all()
    with torch.no_grad():
        model, _ = inference.load_model(run_dir / "best.pt", "cpu")
        probs = class_probabilities(model(torch.randn(2, 3, 32, 24)))
    torch.testing.assert_close(probs.sum(1), torch.ones(2))


@pytest.mark.parametrize("unused", [dict(class_weights=True), dict(age_sigma=5.0), dict(f1_weight=0.5)])
def test_options_the_f1_criterion_would_not_use_are_refused_before_a_run_folder_is_made(unused, data, tmp_path):
    with pytest.raises(SystemExit, match=f"--criterion f1 .* does not use --{next(iter(unused))}"):
        train.main(make_cfg(data, tmp_path / "runs", criterion="f1", **unused))
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_model_settings_are_checked_before_a_run_folder_is_made_and_frozen_weights_stay_out_of_the_optimizer(
        data, tmp_path):
    with pytest.raises(SystemExit, match="--freeze_blocks 2 keeps"):
        train.main(make_cfg(data, tmp_path / "runs", freeze_blocks=2))  # basemodel has no ImageNet layers
    with pytest.raises(SystemExit, match="--resize 32 24 is too small for efficientnet-lite0"):
        train.main(make_cfg(data, tmp_path / "runs", model="efficientnet-lite0", pretrained=True))
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())
    cfg = {**default_config("train"), "model": "resnet18", "pretrained": False, "freeze_blocks": 2,
           "backbone_lr_scale": 0.1}
    model = create_model(cfg)
    in_optimizer = {id(p) for group in train.build_optimizer(cfg, model).param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    assert len(in_optimizer) < len(list(model.parameters()))


def test_scheduler_lr_after_two_epochs(data, tmp_path):
    """step decays by lr_gamma every lr_decay_step epochs; the recorded lr is the epoch's start."""
    run_dir, _ = train.main(make_cfg(data, tmp_path / "runs", epochs=2, scheduler="step", lr_decay_step=1,
                                     lr_gamma=0.5))
    np.testing.assert_allclose(pd.read_csv(run_dir / "metrics.csv")["lr"], [1e-3, 5e-4])


@pytest.mark.parametrize("total_steps", range(1, 9))
def test_one_cycle_runs_however_few_steps_a_run_has(total_steps):
    """A tiny run (a few batches, a few epochs) rises to the peak and falls, instead of stopping
    with OneCycleLR's division by zero at 4 steps."""
    optimizer = train.build_optimizer(default_config("train"), torch.nn.Linear(2, 2))
    scheduler = train.build_scheduler(default_config("train"), optimizer, 1, total_steps)
    lrs = []
    for _ in range(total_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert max(lrs) <= 1e-3 and (total_steps < 4 or lrs[-1] < max(lrs))
    if total_steps < 4:  # too few to rise and fall: every step at the peak, not far below it
        assert lrs == [1e-3] * total_steps


def test_one_cycle_keeps_sgd_momentum_and_cycles_adam_beta1():
    """SGD's --momentum is used as given; Adam's beta1 follows the 1cycle policy, as args.json says."""
    for optimizer_name, read, expected in [("SGD", lambda g: g["momentum"], {0.5}),
                                           ("AdamW", lambda g: g["betas"][0], {0.95, 0.85})]:
        cfg = {**default_config("train"), "optimizer": optimizer_name, "momentum": 0.5, "scheduler": "one_cycle"}
        optimizer = train.build_optimizer(cfg, torch.nn.Linear(2, 2))
        scheduler = train.build_scheduler(cfg, optimizer, steps_per_epoch=10, epochs=2)
        seen = []
        for _ in range(20):
            seen.append(round(read(optimizer.param_groups[0]), 6))
            optimizer.step()
            scheduler.step()
        assert {seen[0], min(seen)} == expected and set(seen) >= expected


def test_refit_trains_for_the_folds_median_best_epoch_a_half_rounded_up():
    assert [train.refit_epochs([{"best_epoch": e} for e in best]) for best in ([2, 3], [3, 4, 5, 6], [4, 4, 5], [1])] \
        == [3, 5, 4, 1]


def test_patience_stops_the_run_and_a_resumed_run_stops_there_too(data, tmp_path):
    """A run interrupted after its last checkpoint but before summary.json (the patience already
    run out) resumes to the same end, instead of training on."""
    cfg = make_cfg(data, tmp_path / "runs", epochs=8, patience=1, lr=0.05, report=False)
    run_dir, summaries = train.main(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_run"] == summary["best_epoch"] + 1 < 8
    assert len(pd.read_csv(run_dir / "metrics.csv")) == summary["epochs_run"]
    assert "early stop: no better validation macro F1 for 1 epochs" in (run_dir / "train.log").read_text()
    (run_dir / "summary.json").unlink()
    train.main({**default_config("train"), "resume": str(run_dir), "num_workers": 0, "device": "cpu"})
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert resumed["epochs_run"] == summary["epochs_run"] and resumed["best_valid_f1"] == summary["best_valid_f1"]


def test_time_limit_stops_before_an_epoch_that_would_pass_it():
    history = [{"train_seconds": 50.0}, {"train_seconds": 70.0}]  # 120 s spent, 60 s per epoch
    assert not train.time_limit_reached({"max_train_minutes": 0}, history)
    assert not train.time_limit_reached({"max_train_minutes": 1e-9}, [])  # the first epoch always runs
    assert not train.time_limit_reached({"max_train_minutes": 3.0}, history)  # 180 s: exactly fits
    assert train.time_limit_reached({"max_train_minutes": 2.9}, history)


def test_time_limited_run_stops_early_and_keeps_a_complete_run_folder(data, tmp_path):
    run_dir, summaries = train.main(make_cfg(data, tmp_path / "runs", epochs=3, max_train_minutes=1e-6))
    assert summaries[0]["epochs_run"] == 1 and len(pd.read_csv(run_dir / "metrics.csv")) == 1
    assert "another epoch would pass max_train_minutes" in (run_dir / "train.log").read_text()
    assert (run_dir / "best.pt").is_file() and (run_dir / "summary.json").is_file()


def test_unknown_optimizer_or_scheduler_raises():
    model = torch.nn.Linear(2, 2)
    cfg = default_config("train")
    with pytest.raises(ValueError, match="RMSprop"):
        train.build_optimizer({**cfg, "optimizer": "RMSprop"}, model)
    optimizer = train.build_optimizer(cfg, model)
    with pytest.raises(ValueError, match="linear"):
        train.build_scheduler({**cfg, "scheduler": "linear"}, optimizer, 4, 2)


def test_backbone_lr_scale_gives_the_backbone_its_own_peak_lr():
    cfg = {**default_config("train"), "backbone_lr_scale": 0.1, "lr": 0.01, "pretrained": False}
    model = create_model(cfg)
    optimizer = train.build_optimizer(cfg, model)
    heads, backbone = optimizer.param_groups
    assert {id(p) for p in backbone["params"]} == {id(p) for p in model.backbone.parameters()}
    assert len(heads["params"]) + len(backbone["params"]) == len(list(model.parameters()))
    scheduler = train.build_scheduler(cfg, optimizer, steps_per_epoch=4, epochs=2)
    peaks = []
    for _ in range(8):
        peaks.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    head_peak, backbone_peak = (max(lrs) for lrs in zip(*peaks))
    assert head_peak == pytest.approx(0.01, rel=0.05) and backbone_peak == pytest.approx(0.001, rel=0.05)


def test_kfold_and_refit_decode_every_image_once(data, tmp_path):
    """One decode cache serves every fold, its validation and the refit."""
    cache_dir = tmp_path / "own_cache"
    cfg = make_cfg(data, tmp_path / "runs", val_ratio=0.5, fold="all", refit=True, cache_dir=str(cache_dir),
                   report=False)
    train.main(cfg)
    arrays = list(cache_dir.glob("*.npy"))
    assert len(arrays) == 1
    assert np.load(arrays[0], mmap_mode="r").shape[0] == N_PEOPLE * len(MASK_FILES)


def test_cache_workers_read_the_cache_in_worker_processes_and_repeat_the_run_exactly(data, tmp_path, monkeypatch):
    """With cache_workers the cached batches come from worker processes (by default the main
    process reads them), and the run still repeats exactly."""
    workers_seen = []
    real_loader = train.DataLoader

    def recording_loader(dataset, **kwargs):
        workers_seen.append(kwargs["num_workers"])
        return real_loader(dataset, **kwargs)

    monkeypatch.setattr(train, "DataLoader", recording_loader)
    cfg = make_cfg(data, tmp_path / "runs", cache_workers=2, report=False)
    first, _ = train.main(cfg)
    assert workers_seen and set(workers_seen) == {2}
    assert "loader: 2 worker process(es) reading the decode cache" in (first / "train.log").read_text()
    second, _ = train.main(cfg)
    pd.testing.assert_frame_equal(metrics_without_timing(first), metrics_without_timing(second), check_exact=True)
    assert_same_state(model_state(first / "best.pt"), model_state(second / "best.pt"))


def test_bad_data_is_a_clean_error_naming_the_file(data, tmp_path):
    cfg = make_cfg(data, tmp_path / "runs", data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit) as exc:
        train.main(cfg)
    assert str(exc.value.code).startswith("error: ") and "nowhere: no such folder; give the training folder" in str(exc.value.code)
    assert not (tmp_path / "runs").exists()  # checked before any folder is made: nothing for a next run to find
    with pytest.raises(SystemExit, match=r"--extra_data .*elsewhere: no such folder or label CSV"):
        train.main(make_cfg(data, tmp_path / "runs", extra_data=[str(tmp_path / "elsewhere")]))
    assert not (tmp_path / "runs").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="empty/train.csv: file not found"):
        train.main(make_cfg(data, tmp_path / "runs", data_dir=str(tmp_path / "empty")))


@pytest.mark.parametrize("fold", ["3", "-1", "x"])  # val_ratio 0.34 makes 3 folds; -1 marks extra data
def test_a_fold_the_split_does_not_have_is_refused_before_a_run_folder_is_made(data, tmp_path, fold):
    with pytest.raises(SystemExit, match=f"--fold {fold} is not a fold of this split: give 0..2"):
        train.main(make_cfg(data, tmp_path / "runs", fold=fold))
    assert not (tmp_path / "runs").exists()
    for threshold in (30, 101):
        with pytest.raises(SystemExit, match="--age_threshold must be above 30"):
            train.main(make_cfg(data, tmp_path / "runs", age_threshold=threshold))
    for val_ratio in (1.5, 0.6):  # above 0.5, round(1 / val_ratio) would still make 2 folds of half each
        with pytest.raises(SystemExit, match="val_ratio must be 0"):
            train.main(make_cfg(data, tmp_path / "runs", val_ratio=val_ratio))
    assert not (tmp_path / "runs").exists()


def test_an_output_dir_that_is_a_file_is_refused(data, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="file is a file; give a folder"):
        train.main(make_cfg(data, tmp_path / "runs", output_dir=str(tmp_path / "file")))


def interrupt_second_epoch(monkeypatch, stop):
    """Make train_one_epoch call stop() when the second epoch starts."""
    real, calls = train.train_one_epoch, []

    def second_epoch_stopped(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            stop()
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", second_epoch_stopped)


def test_resume_refuses_training_data_that_changed_since_the_run_started(data, tmp_path, monkeypatch):
    """Other people in train.csv would be split into other folds: the epochs trained before the
    interruption would be validated on people they trained on. Put back, the run resumes."""
    shutil.copytree(data / "sample", tmp_path / "sample")
    cfg = make_cfg(data, tmp_path / "runs", data_dir=str(tmp_path / "sample" / "train"), epochs=2)

    def ctrl_c():
        raise KeyboardInterrupt

    interrupt_second_epoch(monkeypatch, ctrl_c)
    with pytest.raises(SystemExit):
        train.main(cfg)
    monkeypatch.undo()
    run_dir = tmp_path / "runs" / "exp"
    train_csv = tmp_path / "sample" / "train" / "train.csv"
    original = train_csv.read_text()
    people = pd.read_csv(train_csv, dtype=str)
    people.iloc[2:].to_csv(train_csv, index=False)  # two people left out
    split_before = (run_dir / "split.csv").read_text()
    resume_cfg = {**default_config("train"), "resume": str(run_dir), "num_workers": 0, "device": "cpu"}
    with pytest.raises(SystemExit, match=r"training data changed since this run started .*split.csv.*2 removed "
                                         rf"\['{people['id'][0]}', '{people['id'][1]}'\]"):
        train.main(resume_cfg)
    assert (run_dir / "split.csv").read_text() == split_before and (run_dir / "last.pt").is_file()
    train_csv.write_text(original)
    train.main(resume_cfg)
    assert pd.read_csv(run_dir / "metrics.csv")["epoch"].tolist() == [1, 2]


def test_sigterm_stops_a_run_as_ctrl_c_does(data, tmp_path, monkeypatch):
    """kill, timeout and job schedulers send SIGTERM: the run keeps its checkpoint, logs how to
    resume and exits with 143; the handler that was there before comes back."""
    before = signal.getsignal(signal.SIGTERM)
    interrupt_second_epoch(monkeypatch, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(SystemExit) as stop:
        train.main(make_cfg(data, tmp_path / "runs", epochs=2))
    monkeypatch.undo()
    run_dir = tmp_path / "runs" / "exp"
    assert stop.value.code == 143
    assert signal.getsignal(signal.SIGTERM) is before
    assert "interrupted; continue with: python train.py --resume" in (run_dir / "train.log").read_text()
    train.main({**default_config("train"), "resume": str(run_dir), "num_workers": 0, "device": "cpu"})
    assert pd.read_csv(run_dir / "metrics.csv")["epoch"].tolist() == [1, 2]


def test_ctrl_c_while_the_report_is_drawn_says_the_run_is_finished(data, tmp_path, monkeypatch):
    import report

    def ctrl_c(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "write_report", ctrl_c)
    with pytest.raises(SystemExit) as stop:
        train.main(make_cfg(data, tmp_path / "runs", report=True))
    run_dir = tmp_path / "runs" / "exp"
    assert stop.value.code == 130 and (run_dir / "summary.json").is_file()
    assert f"the run is finished; draw it with: python report.py --run {run_dir}" in (run_dir / "train.log").read_text()


@pytest.mark.filterwarnings("ignore:.*CUDA:UserWarning")  # a machine without a GPU warns, builds them anyway
@pytest.mark.parametrize("capability, dtype, scaled", [((7, 0), torch.float16, True), ((8, 0), torch.bfloat16, False)])
def test_mixed_precision_is_bf16_only_on_gpus_with_native_bf16(monkeypatch, capability, dtype, scaled):
    """V100 / T4 (7.x) get fp16 with a gradient scaler, not the bf16 they only emulate."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    autocast, scaler = train.autocast_for(torch.device("cuda"), True)
    assert (scaler is not None) == scaled
    assert autocast().fast_dtype == dtype
    assert train.autocast_for(torch.device("cpu"), True) == (contextlib.nullcontext, None)


# ---------------------------------------------------------------------------------------------
# The best epoch, seeds per epoch, TTA
def test_the_best_epoch_is_the_first_with_the_top_f1_and_its_outputs_are_kept(data, tmp_path, monkeypatch):
    """Validation macro F1s of 0.5, 0.7, 0.7 (a tie), 0.6, 0.9 with patience 2: the best epoch is
    2, the first of the tie (a tie is no improvement and counts towards patience, so epoch 5
    never runs); best.pt, valid_probs.csv and summary.json's valid_* metrics are epoch 2's,
    not the last epoch's."""
    f1s, epoch_probs = iter([0.5, 0.7, 0.7, 0.6, 0.9]), []
    real_score, real_predict = train.score, train.predict

    def scripted_score(labels, preds):
        return {**real_score(labels, preds), "f1": next(f1s)}

    def recording_predict(*args, **kwargs):
        epoch_probs.append(real_predict(*args, **kwargs))
        return epoch_probs[-1]

    monkeypatch.setattr(train, "score", scripted_score)
    monkeypatch.setattr(train, "predict", recording_predict)
    cfg = make_cfg(data, tmp_path / "runs", epochs=5, patience=2, lr=0.05, report=False)
    run_dir, summaries = train.main(cfg)
    monkeypatch.undo()

    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert metrics["valid_f1"].tolist() == [0.5, 0.7, 0.7, 0.6] and len(epoch_probs) == 4
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["best_epoch"], summary["best_valid_f1"], summary["epochs_run"]) == (2, 0.7, 4)
    assert summaries == {0: summary}
    best_row = metrics.drop(columns=TIMING).iloc[1]
    for key, value in best_row.items():
        if key.startswith("valid_"):
            assert summary[key] == pytest.approx(value), key
    assert summary["valid_f1"] != metrics["valid_f1"].iloc[-1]
    assert torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)["epoch"] == 2

    # valid_probs.csv holds the best epoch's probabilities (those best.pt predicts), not the last epoch's
    table = pd.read_csv(run_dir / "valid_probs.csv")
    written = table[PROB_COLUMNS].to_numpy()
    np.testing.assert_allclose(written, epoch_probs[1], atol=1e-6)
    assert np.abs(epoch_probs[-1] - epoch_probs[1]).max() > 1e-4  # the epochs after it predicted otherwise
    sample, normalize = build_transform("plain", cfg["resize"], cfg["mean"], cfg["std"])
    dataset = make_dataset(table, {**cfg, "cache_dir": ""}, sample)
    model = inference.load_model(run_dir / "best.pt", torch.device("cpu"))[0]
    probs = train.predict(model, DataLoader(dataset, batch_size=64), torch.device("cpu"), preprocess=normalize)
    np.testing.assert_allclose(probs, written, atol=1e-5)
    assert (table["pred"] == table["label"]).mean() == pytest.approx(summary["valid_accuracy"])


def test_drop_ages_also_leave_the_refit_and_the_pseudo_label_stage(data, tmp_path):
    """drop_ages 29 and 60 remove people 1, 2, 3 and 5 from every training set: the folds', the
    refit's (every other person) and the pseudo-label stage's (every other person plus the eval images)."""
    people = pd.read_csv(data / "sample" / "train" / "train.csv")
    kept = int((~people["age"].isin([29, 60])).sum())
    assert 0 < kept < N_PEOPLE
    cfg = make_cfg(data, tmp_path / "runs", val_ratio=0.5, fold="all", refit=True, pseudo_threshold=0.05,
                   drop_ages=[29, 60], report=False)
    run_dir, _ = train.main(cfg)
    split = pd.read_csv(run_dir / "split.csv")
    for k in (0, 1):
        fold_people = int(((split["fold"] != k) & ~split["age"].isin([29, 60])).sum())
        assert training_images_logged(run_dir, run_dir / f"fold{k}") == (7 * fold_people, fold_people, 0)
    assert training_images_logged(run_dir, run_dir / "refit") == (7 * kept, kept, 0)
    n_eval = len(pd.read_csv(run_dir / "pseudo" / "labels.csv"))
    assert n_eval > 0
    assert training_images_logged(run_dir, run_dir / "pseudo") == (7 * kept + n_eval, kept, n_eval)


class _Indices(torch.utils.data.Dataset):
    """A stand-in training set whose items are their own indices."""

    def __init__(self, n):
        self.labels = np.arange(n) % NUM_CLASSES

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return i

    def loader_workers(self, cfg, device):
        return 0


@pytest.mark.parametrize("balanced_sampler", [False, True])
def test_each_epoch_gets_its_own_batch_order_repeatable_from_seed_and_epoch(balanced_sampler):
    cfg = {**default_config("train"), "batch_size": 8, "num_workers": 0, "balanced_sampler": balanced_sampler}
    dataset = _Indices(40)

    def order(epoch, seed=cfg["seed"]):
        return torch.cat(list(train.make_loader(dataset, {**cfg, "seed": seed}, epoch, torch.device("cpu")))).tolist()

    orders = [order(epoch) for epoch in range(3)]
    assert orders[0] == order(0) and orders[1] == order(1)  # a function of (seed, epoch)
    assert len({tuple(o) for o in orders}) == 3  # another order every epoch
    assert order(0, seed=7) != orders[0]
    if not balanced_sampler:
        assert all(sorted(o) == list(range(40)) for o in orders)


def test_each_epoch_draws_its_own_augmentation_and_dropout_randomness(data, tmp_path, monkeypatch):
    """The global RNGs (augmentation, mixing, dropout) are reseeded at every epoch from (seed,
    epoch): another stream each epoch, the same for an epoch whenever it runs."""
    states, real = [], train.train_one_epoch

    def recording(*args, **kwargs):
        states.append((torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()))
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", recording)
    cfg = make_cfg(data, tmp_path / "runs", epochs=2, report=False)
    train.main(cfg)
    assert len(states) == 2
    (torch_a, numpy_a, python_a), (torch_b, numpy_b, python_b) = states
    assert not torch.equal(torch_a, torch_b)
    assert not np.array_equal(numpy_a, numpy_b) and python_a != python_b
    train.seed_everything(cfg["seed"] * 1000 + 1)
    assert torch.equal(torch.get_rng_state(), torch_b)


def test_tta_flip_crops_is_the_mean_of_the_image_the_centre_crop_and_their_mirrors():
    """flip_crops averages four views: the image, its mirror, the crop without 5% (rounded down)
    of each side resized back to the full size (bilinear), and that crop's mirror."""
    torch.manual_seed(0)
    model = create_model({**default_config("train"), "model": "basemodel", "pretrained": False})
    device = torch.device("cpu")
    images = torch.randn(5, 3, 64, 48)

    def plain(views):
        return train.predict(model, DataLoader(torch.utils.data.TensorDataset(views), batch_size=3), device, tta="none")

    crop = torch.nn.functional.interpolate(images[..., 3:61, 2:46], size=(64, 48), mode="bilinear")  # 64 // 20, 48 // 20
    views = [plain(images), plain(images.flip(-1)), plain(crop), plain(crop.flip(-1))]
    assert np.abs(views[2] - views[3]).max() > 1e-4  # the crop's mirror is another view
    crops = train.predict(model, DataLoader(torch.utils.data.TensorDataset(images), batch_size=3), device,
                          tta="flip_crops")
    np.testing.assert_allclose(crops, sum(views) / 4, atol=1e-6)
