"""bench.py's recipe names and its checks before any work (the benchmark itself is `make bench`,
not a test)."""
import argparse
import json
import math
import shutil
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import f1_score

import bench
from config import default_config
from dataset import load_training_images


def test_a_recipe_is_a_config_file_with_typed_overrides():
    best = json.loads((bench.ROOT / "configs" / "best.json").read_text())
    cfg = bench.recipe_config("best+head=single+epochs=3+resize=[160,120]+fold=0+pretrained=false+tta=flip_crops")
    assert cfg == {**best, "head": "single", "epochs": 3, "resize": [160, 120], "fold": "0", "pretrained": False,
                   "tta": "flip_crops"}
    assert bench.recipe_config("best") == best
    assert bench.run_name("best+resize=[160,120]") == "best__resize-[160,120]"


@pytest.mark.parametrize("recipe, message", [
    ("bset", r"there is no configs/bset\.json \(there are: .*best"),
    ("best+head", "override 'head' is not key=value"),
    ("best+haed=single", r"unknown key haed \(did you mean head\?\)"),
    ("best+epochs=abc", "'epochs' should look like 6, got 'abc'"),
    ("best+resize=160,120", r"'resize' should look like \[128, 96\], got '160,120'"),
    ("best+head=singel", "'head' is 'singel', not one of"),
])
def test_a_bad_recipe_is_refused_by_name(recipe, message):
    with pytest.raises(SystemExit, match=message):
        bench.recipe_config(recipe)


def test_a_bad_recipe_or_maskbench_folder_stops_bench_before_it_builds_anything(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="no build.py, score.py, faces.csv, faces"):
        bench.main(["--maskbench", str(tmp_path / "nowhere"), "--out", str(out)])
    maskbench = tmp_path / "maskbench"
    (maskbench / "faces").mkdir(parents=True)
    for name in ("build.py", "score.py", "faces.csv"):
        (maskbench / name).write_text("")
    with pytest.raises(SystemExit, match="there is no configs/bset.json"):
        bench.main(["--maskbench", str(maskbench), "--out", str(out), "--recipes", "best", "bset"])
    with pytest.raises(SystemExit, match="val_ratio must be 0"):  # a value train.py would refuse after the build
        bench.main(["--maskbench", str(maskbench), "--out", str(out), "--recipes", "baseline+val_ratio=0.6"])
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--speed_only", "--skip_training"], "--speed_only times the recipes' training, which --skip_training leaves out"),
    (["--size", "100"], "--size must be WxH, e.g. 192x256, got '100'"),
    (["--tta", "flips"], "invalid choice: 'flips'"),
    (["--limit", "-5"], "--limit must be at least 0, got -5"),
    (["--num_workers", "-1"], "--num_workers must be at least 0, got -1"),
    (["--budget_minutes", "-1"], "--budget_minutes must be at least 0, got -1.0"),
    (["--record", "/nowhere/B.md"], "--record /nowhere/B.md: there is no folder /nowhere"),
])
def test_bench_options_that_cannot_work_are_refused(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        bench.main(["--maskbench", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), *argv])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_maskbench_build_cut_short_is_refused_not_measured(tmp_path):
    out = tmp_path / "data"
    (out / "train").mkdir(parents=True)
    (out / "train" / "train.csv").write_text("id,gender,race,age,path\n")  # build.py writes build_info.json last
    with pytest.raises(SystemExit, match="holds an unfinished maskbench build .* delete the folder"):
        bench.build_maskbench(tmp_path / "maskbench", "192x256", out)


def test_a_build_from_other_faces_is_refused(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "build_info.json").write_text("{}")  # a finished build
    for name in ("mb", "moved", "other"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "faces.csv").write_text("file,age\na.jpg,30\n" if name != "other" else "file,age\nb.jpg,30\n")
    bench.build_maskbench(tmp_path / "mb", "192x256", out)  # an older build, without a record: taken as this one
    bench.build_maskbench(tmp_path / "moved", "192x256", out)  # the same faces at another path
    with pytest.raises(SystemExit, match=r"data was built from other faces \(.*moved/faces.csv differs from .*other"):
        bench.build_maskbench(tmp_path / "other", "192x256", out)


def test_speed_only_times_the_model_and_the_whole_pipeline_and_reports_both(train_cfg, tmp_path, monkeypatch):
    cfg = {**train_cfg, "cache_workers": -1}
    row = bench.recipe_speed("tiny", cfg, load_training_images(cfg), torch.device("cpu"), tmp_path / "probe", images=64)
    assert (row["input"], row["batch_size"], row["cache_readers"]) == ("24x32", 16, 0)  # the CPU reads in the main process
    assert row["model_images_per_s"] > 0 and row["pipeline_images_per_s"] > 0
    assert len(pd.read_csv(tmp_path / "probe" / "metrics.csv")) == 2  # timed on the second of two epochs
    args = argparse.Namespace(size="192x256", limit=0, num_workers=2, record=str(tmp_path / "BENCHMARKS.md"))
    bench.write_report(args, None, [], "", [row, {**row, "recipe": "workers", "cache_readers": 4}])
    report = (tmp_path / "BENCHMARKS.md").read_text()
    assert "training pipeline: train.py's loop on the first 64 training images" in report
    for recipe, readers in [("tiny", "the main process"), ("workers", "4 workers")]:
        assert (f"| {recipe} | 24x32 | 16 | {readers} | {row['model_images_per_s']:.1f} | "
                f"{row['pipeline_images_per_s']:.1f} |") in report
    clock = iter(range(100))  # every reading one second after the last: the timed steps take 1 s
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(time=lambda: float(next(clock))))
    assert bench.model_throughput(cfg, torch.device("cpu")) == 6 * 16  # 6 timed steps of batch 16 on a CPU


def test_a_bench_that_measured_nothing_records_nothing(tmp_path, capsys):
    args = argparse.Namespace(size="192x256", limit=0, num_workers=2, record=str(tmp_path / "BENCHMARKS.md"))
    bench.write_report(args, None, [], "", [])
    assert not (tmp_path / "BENCHMARKS.md").exists()
    assert "nothing was measured" in capsys.readouterr().out


def test_the_pipeline_speed_counts_the_images_there_are(train_cfg, tmp_path):
    table = load_training_images(train_cfg)
    row = bench.recipe_speed("tiny", train_cfg, table, torch.device("cpu"), tmp_path / "probe", images=10 * len(table))
    assert row["images"] == len(table)


def test_resampled_people_give_the_macro_f1_of_their_images():
    """Each redraw scores as sklearn scores the drawn people's images (a person drawn twice counts
    twice); a person always right or always wrong moves it only through the others."""
    rng = np.random.default_rng(1)
    person = np.repeat(np.arange(30), 7)
    true = rng.integers(0, 18, len(person))
    pred = np.where(rng.random(len(person)) < 0.6, true, rng.integers(0, 18, len(person)))
    f1s = bench.resampled_macro_f1(true, pred, person, draws=5, seed=3)
    weights = np.random.default_rng(3).multinomial(30, np.full(30, 1 / 30), size=5)
    for f1, w in zip(f1s, weights):
        rows = np.concatenate([np.flatnonzero(person == k) for k in range(30) for _ in range(w[k])])
        assert f1 == pytest.approx(f1_score(true[rows], pred[rows], average="macro"))
    assert bench.resampled_macro_f1(true, true, person, draws=20, seed=0).tolist() == [1.0] * 20



def test_a_class_predicted_but_never_true_counts_in_the_resampled_macro_f1():
    """As sklearn's macro F1: a class only predicted averages in with F1 0."""
    person = np.repeat(np.arange(4), 7)
    true = np.zeros(len(person), int)
    pred = np.where(person < 2, 0, 5)  # two people right, two given class 5, which nobody is
    weights = np.random.default_rng(0).multinomial(4, np.full(4, 0.25), size=10)
    for f1, w in zip(bench.resampled_macro_f1(true, pred, person, draws=10, seed=0), weights):
        rows = np.concatenate([np.flatnonzero(person == k) for k in range(4) for _ in range(w[k])])
        assert f1 == pytest.approx(f1_score(true[rows], pred[rows], average="macro"))

def test_the_sd_over_people_is_read_from_the_answers_and_the_submission(tmp_path):
    person = np.repeat(np.arange(40), 7)
    true = np.tile(np.arange(7), 40)
    pred = np.where(person < 20, true, (true + 1) % 18)  # half the people right, half wrong
    ids = [f"{k}.jpg" for k in range(len(person))]
    pd.DataFrame({"ImageID": ids, "ans": true, "person": person, "age": 30}).to_csv(tmp_path / "detail.csv", index=False)
    pd.DataFrame({"ImageID": ids[::-1], "ans": pred[::-1]}).to_csv(tmp_path / "submission.csv", index=False)
    sd = bench.people_resampled_sd(tmp_path / "detail.csv", tmp_path / "submission.csv")
    assert 0.03 < sd < 0.2
    pd.DataFrame({"ImageID": ids, "ans": true}).to_csv(tmp_path / "perfect.csv", index=False)
    assert bench.people_resampled_sd(tmp_path / "detail.csv", tmp_path / "perfect.csv") == 0


class FakeScripts:
    """subprocess.run for run_recipe: records each script it runs and writes what the script
    would (a finished run's config.json and summary.json; a submission with its inference.json;
    score.py's JSON), without training anything."""

    def __init__(self):
        self.calls = []

    def __call__(self, cmd, **kwargs):
        cmd = [str(c) for c in cmd]
        script, flags = Path(cmd[1]).name, dict(zip(cmd[2::2], cmd[3::2]))
        self.calls.append(script if "--resume" not in flags else "train.py --resume")
        if script == "train.py" and "--resume" in flags:
            pass  # the run's files are there already
        elif script == "train.py":
            run = Path(flags["--output_dir"])
            run.mkdir(parents=True, exist_ok=True)
            config = {**default_config("train"), **json.loads(Path(flags["--config"]).read_text()),
                      "data_dir": flags["--data_dir"]}
            (run / "config.json").write_text(json.dumps(config))
            (run / "summary.json").write_text(json.dumps({"best_valid_f1": 0.5 if config["val_ratio"] else None}))
            pd.DataFrame({"train_seconds": [6.0], "train_images_per_s": [50.0], "valid_images_per_s": [90.0]}).to_csv(
                run / "metrics.csv", index=False)
        elif script == "inference.py":
            run = Path(flags["--run"])
            (run / "submission.csv").write_text("ImageID,ans\n")
            (run / "inference.json").write_text(json.dumps({"config": {"tta": flags["--tta"]}}))
        return types.SimpleNamespace(stdout=json.dumps({key: 0.5 for key in ("macro_f1", "accuracy", "mask_f1",
                                                                            "gender_f1", "age_f1")}))


def test_a_finished_recipe_is_reused_only_on_the_same_data_settings_and_tta(sample_dir, tmp_path, monkeypatch):
    """A budgeted recipe's epochs come from a speed probe, which differs from one bench to the
    next: the second bench reuses the first's sizing, so its finished run too; another maskbench
    build (another --size or --limit) trains its own run beside it, a changed default retrains,
    and another --tta predicts again."""
    scripts, probes = FakeScripts(), [50.0, 80.0]  # images/s: 5 and then 8 epochs fit the 0.1-minute budget
    monkeypatch.setattr(bench.subprocess, "run", scripts)
    monkeypatch.setattr(bench, "model_throughput", lambda cfg, device: 100.0)
    monkeypatch.setattr(bench, "pipeline_throughput", lambda *a, **k: probes.pop(0))
    data = tmp_path / "data_a"
    shutil.copytree(sample_dir, data)
    args = argparse.Namespace(epochs=0, budget_minutes=0.1, tta="none", cuda_input="", cache_dir=tmp_path / "cache",
                              num_workers=0, maskbench=tmp_path / "maskbench")
    recipe = "baseline+resize=[32,24]+batch_size=16"
    cpu = torch.device("cpu")
    run_dir = tmp_path / "runs" / "data_a" / bench.run_name(recipe)
    sized = run_dir.parent / f"{run_dir.name}.json"  # the epochs and budget it is trained with

    row = bench.run_recipe(recipe, args, data, tmp_path / "runs", cpu)
    assert scripts.calls == ["train.py", "inference.py", "score.py"] and json.loads(sized.read_text())["epochs"] == 5
    assert row["recipe"] == recipe
    row = bench.run_recipe(recipe, args, data, tmp_path / "runs", cpu)
    assert scripts.calls[3:] == ["score.py"] and probes == [80.0]  # no second probe: its sizing is reused
    assert json.loads((run_dir / "config.json").read_text())["epochs"] == 5 and row["recipe"] == f"{recipe} (reused)"
    (run_dir / "inference.json").write_text(json.dumps({"config": {"tta": "flip"}}))  # predicted another way
    bench.run_recipe(recipe, args, data, tmp_path / "runs", cpu)
    assert scripts.calls[4:] == ["inference.py", "score.py"]
    other = tmp_path / "data_b"
    shutil.copytree(sample_dir, other)
    bench.run_recipe(recipe, args, other, tmp_path / "runs", cpu)
    assert scripts.calls[6:] == ["train.py", "inference.py", "score.py"] and probes == []  # probed on the new build
    trained = json.loads((tmp_path / "runs" / "data_b" / run_dir.name / "config.json").read_text())
    assert trained["data_dir"] == str(other / "train") and trained["epochs"] == 8
    bench.run_recipe(recipe, args, data, tmp_path / "runs", cpu)  # the first build's run is still there
    assert scripts.calls[9:] == ["score.py"]
    saved = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**saved, "seed": saved["seed"] + 1}))  # as if a default changed
    bench.run_recipe(recipe, args, data, tmp_path / "runs", cpu)
    assert scripts.calls[10:] == ["train.py", "inference.py", "score.py"]



class Stop(Exception):
    pass


@pytest.mark.parametrize("overrides, epochs, minutes", [
    ("", 5, 0.1),  # 1.5 headroom x 0.1 min x 60 s x 50 images/s / 101 training images = 4.5 -> 5
    ("+fold=all+val_ratio=0.5", 4, 0.05),  # 2 folds share the budget: 1.5 x 6 x 50 / (63 x 2) = 3.6 -> 4
    ("+scheduler=cosine", 3, 0.1),  # a schedule spanning the run gets no headroom: 6 x 50 / 101 = 2.97 -> 3
])
def test_a_budgeted_recipe_is_sized_from_its_probe(sample_dir, tmp_path, monkeypatch, overrides, epochs, minutes):
    def stop(cmd, **kwargs):
        raise Stop
    monkeypatch.setattr(bench.subprocess, "run", stop)  # stops at train.py, after the sizing is written
    monkeypatch.setattr(bench, "model_throughput", lambda cfg, device: 100.0)
    monkeypatch.setattr(bench, "pipeline_throughput", lambda *a, **k: 50.0)
    args = argparse.Namespace(epochs=0, budget_minutes=0.1, tta="none", cuda_input="", cache_dir=tmp_path / "cache",
                              num_workers=0, maskbench=tmp_path / "maskbench")
    recipe = "baseline+resize=[32,24]+batch_size=16" + overrides
    with pytest.raises(Stop):
        bench.run_recipe(recipe, args, sample_dir, tmp_path / "runs", torch.device("cpu"))
    sized = json.loads((tmp_path / "runs" / sample_dir.name / f"{bench.run_name(recipe)}.json").read_text())
    assert (sized["epochs"], sized["max_train_minutes"]) == (epochs, minutes)


def test_a_sizing_for_another_budget_is_probed_again(sample_dir, tmp_path, monkeypatch):
    scripts, probes = FakeScripts(), [50.0, 50.0]
    monkeypatch.setattr(bench.subprocess, "run", scripts)
    monkeypatch.setattr(bench, "model_throughput", lambda cfg, device: 100.0)
    monkeypatch.setattr(bench, "pipeline_throughput", lambda *a, **k: probes.pop(0))
    args = argparse.Namespace(epochs=0, budget_minutes=0.1, tta="none", cuda_input="", cache_dir=tmp_path / "cache",
                              num_workers=0, maskbench=tmp_path / "maskbench")
    recipe = "baseline+resize=[32,24]+batch_size=16"
    bench.run_recipe(recipe, args, sample_dir, tmp_path / "runs", torch.device("cpu"))
    args.budget_minutes = 0.2
    bench.run_recipe(recipe, args, sample_dir, tmp_path / "runs", torch.device("cpu"))
    assert probes == [] and scripts.calls == ["train.py", "inference.py", "score.py"] * 2
    sized = json.loads((tmp_path / "runs" / sample_dir.name / f"{bench.run_name(recipe)}.json").read_text())
    assert (sized["epochs"], sized["max_train_minutes"]) == (9, 0.2)  # 1.5 x 12 x 50 / 101 = 8.9

def test_a_recipe_without_validation_is_reported_not_a_crash(sample_dir, tmp_path, monkeypatch):
    """val_ratio 0 trains on everyone: no valid F1, and the other recipes' rows are still written."""
    monkeypatch.setattr(bench.subprocess, "run", FakeScripts())
    monkeypatch.setattr(bench, "model_throughput", lambda cfg, device: 100.0)
    args = argparse.Namespace(epochs=1, budget_minutes=0, tta="none", cuda_input="", cache_dir=tmp_path / "cache",
                              num_workers=0, maskbench=tmp_path / "maskbench", size="192x256", limit=0,
                              record=str(tmp_path / "BENCHMARKS.md"))
    rows = [bench.run_recipe(recipe, args, sample_dir, tmp_path / "runs", torch.device("cpu"))
            for recipe in ("baseline", "baseline+val_ratio=0")]
    assert rows[0]["valid_f1"] == 0.5 and math.isnan(rows[1]["valid_f1"])
    bench.write_report(args, None, rows, "", [])
    report = (tmp_path / "BENCHMARKS.md").read_text()
    assert "| baseline |" in report and "| baseline+val_ratio=0 |" in report and "| nan |" in report


def test_a_refit_recipe_is_finished_only_when_its_refit_is(sample_dir, tmp_path, monkeypatch):
    """train.py refits after a single validation fold too: until refit/summary.json is written
    (an interrupted refit), bench resumes the run rather than reusing it."""
    scripts = FakeScripts()
    monkeypatch.setattr(bench.subprocess, "run", scripts)
    monkeypatch.setattr(bench, "model_throughput", lambda cfg, device: 100.0)
    args = argparse.Namespace(epochs=1, budget_minutes=0, tta="none", cuda_input="", cache_dir=tmp_path / "cache",
                              num_workers=0, maskbench=tmp_path / "maskbench")
    recipe = "baseline+refit=true"
    bench.run_recipe(recipe, args, sample_dir, tmp_path / "runs", torch.device("cpu"))
    bench.run_recipe(recipe, args, sample_dir, tmp_path / "runs", torch.device("cpu"))
    assert scripts.calls == ["train.py", "inference.py", "score.py", "train.py --resume", "inference.py", "score.py"]
    run_dir = tmp_path / "runs" / sample_dir.name / bench.run_name(recipe)
    (run_dir / "refit").mkdir()
    (run_dir / "refit" / "summary.json").write_text("{}")
    bench.run_recipe(recipe, args, sample_dir, tmp_path / "runs", torch.device("cpu"))
    assert scripts.calls[6:] == ["score.py"]
