"""inference.py: submission and eval probabilities of a run, TTA, the submission check,
k-fold averaging, checkpoints, and the pseudo-label round trip through train.py."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

import inference
import report
import train
from config import default_config
import dataset as D
from dataset import NUM_CLASSES, PROB_COLUMNS, decode_class
from conftest import training_images_logged
from make_sample_data import make_sample_dataset
from model import create_model

TASK_COLUMNS = ["mask0", "mask1", "mask2", "gender0", "gender1", "age0", "age1", "age2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference_data")
    make_sample_dataset(root / "sample", n_train_people=18, n_eval_people=6, size=(48, 64), seed=0)
    return root


def make_train_cfg(data, model_dir, **overrides):
    cfg = default_config("train")
    cfg.update(data_dir=str(data / "sample" / "train"), model="basemodel", pretrained=False, weights="",
               resize=[32, 24], epochs=1, batch_size=16, valid_batch_size=32, num_workers=0,
               cache_dir=str(data / "cache"), model_dir=str(model_dir), output_dir="", resume="", val_ratio=0.34,
               fold="0", extra_data=[], log_interval=1000, device="cpu", name="exp")
    cfg.update(overrides)
    return cfg


def make_inference_cfg(data, run, output_dir, **overrides):
    cfg = default_config("inference")
    cfg.update(run=[str(r) for r in (run if isinstance(run, list) else [run])], output_dir=str(output_dir),
               eval_dir="", checkpoint="best", num_workers=0, cache_dir=str(data / "cache"), tta="none",
               pseudo_threshold=0.0, device="cpu", valid_batch_size=16)
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def run_dir(data, tmp_path_factory):
    run, _ = train.main(make_train_cfg(data, tmp_path_factory.mktemp("runs")))
    return run


@pytest.fixture(scope="module")
def kfold_dir(data, tmp_path_factory):
    run, _ = train.main(make_train_cfg(data, tmp_path_factory.mktemp("kfold"), val_ratio=0.5, fold="all",
                                       refit=True, name="kfold"))
    return run


@pytest.fixture(scope="module")
def predicted(data, run_dir, tmp_path_factory):
    """inference.main on the run with TTA flip, written to its own folder."""
    out = tmp_path_factory.mktemp("predicted")
    path = inference.main(make_inference_cfg(data, run_dir, out, tta="flip"))
    return path, out


def info_ids(data):
    return pd.read_csv(data / "sample" / "eval" / "info.csv")["ImageID"].tolist()


# ---------------------------------------------------------------------------------------------
# Submission and eval probabilities
def test_each_checkpoint_predicts_with_the_mixed_precision_it_was_trained_with(data, run_dir, tmp_path, monkeypatch):
    """A --no-amp run was validated in float32; its eval and pseudo-label probabilities must be too."""
    checkpoint = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=False)
    paths = []
    for amp in (True, False):
        paths.append(tmp_path / f"amp_{amp}.pt")
        torch.save({**checkpoint, "config": {**checkpoint["config"], "amp": amp}}, paths[-1])
    real, enabled = inference.autocast_for, []
    monkeypatch.setattr(inference, "autocast_for", lambda device, on: enabled.append(on) or real(device, on))
    inference.predict_eval(paths, make_inference_cfg(data, paths, tmp_path), torch.device("cpu"))
    assert enabled == [True, False]


def test_runs_predict_one_eval_folder_however_their_paths_are_written(data, run_dir, tmp_path, monkeypatch):
    checkpoint = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=False)
    other = tmp_path / "other"
    shutil.copytree(data / "sample" / "eval", other / "eval")
    paths = []
    for name, data_dir in [("relative", "sample/train"), ("absolute", str(data / "sample" / "train")),
                           ("other", str(other / "train"))]:
        paths.append(tmp_path / f"{name}.pt")
        torch.save({**checkpoint, "config": {**checkpoint["config"], "data_dir": data_dir}}, paths[-1])
    monkeypatch.chdir(data)
    probs, _ = inference.predict_eval(paths[:2], make_inference_cfg(data, paths[:2], tmp_path), torch.device("cpu"))
    assert probs.shape == (len(info_ids(data)), NUM_CLASSES)
    with pytest.raises(SystemExit, match=r"the runs predict different eval folders .*other/eval.*give --eval_dir"):
        inference.predict_eval(paths, make_inference_cfg(data, paths, tmp_path), torch.device("cpu"))



@pytest.mark.parametrize("base, other", [({}, {"resize": [40, 32]}), ({}, {"center_crop": [0.6, 0.6]}),
                                         ({}, {"mean": [0.3, 0.3, 0.3]}), ({}, {"std": [0.5, 0.5, 0.5]}),
                                         ({}, {"face_crop": True}), ({"face_crop": True}, {"face_crop": True, "face_margin": 0.0})],
                         ids=["resize", "center_crop", "mean", "std", "face_crop", "face_margin"])
def test_each_checkpoint_reads_the_eval_images_with_its_own_preprocessing(data, run_dir, tmp_path, base, other):
    """Checkpoints predicted together share a dataset only where their preprocessing is the same."""
    from test_faces import write_faces
    shutil.copytree(data / "sample" / "eval", tmp_path / "eval")
    write_faces(tmp_path / "eval", lambda image: (10.0, 12.0, 38.0, 50.0))
    checkpoint = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=False)
    paths = [tmp_path / "base.pt", tmp_path / "other.pt"]
    for path, change in zip(paths, (base, other)):
        torch.save({**checkpoint, "config": {**checkpoint["config"], **change}}, path)
    cfg = make_inference_cfg(data, paths, tmp_path, eval_dir=str(tmp_path / "eval"))
    alone = [inference.predict_eval([path], cfg, torch.device("cpu"))[0] for path in paths]
    assert np.abs(alone[0] - alone[1]).max() > 1e-4  # the change changes what the model sees
    both, _ = inference.predict_eval(paths, cfg, torch.device("cpu"))
    np.testing.assert_allclose(both, (alone[0] + alone[1]) / 2, atol=1e-6)


def test_only_the_folds_of_the_split_are_a_k_fold_runs_folds(folds_only_dir, tmp_path):
    """A copy kept beside the folds (fold0_backup/) would count fold 0 twice; a fold<k> outside
    the run's k folds (a fold of another split copied in) is refused, as report.py does."""
    run = tmp_path / "kfold"
    shutil.copytree(folds_only_dir, run)
    shutil.copytree(run / "fold0", run / "fold0_backup")
    assert inference.find_checkpoints(run) == [run / "fold0" / "best.pt", run / "fold1" / "best.pt"]
    assert inference.fold_dirs(run) == [run / "fold0", run / "fold1"]
    shutil.copytree(run / "fold1", run / "fold2")
    with pytest.raises(SystemExit, match=r"fold2 is not a fold of its 2-fold split \(val_ratio 0.5\)"):
        inference.find_checkpoints(run)
    with pytest.raises(SystemExit, match="fold2 is not a fold of its 2-fold split"):
        report.write_report(run)


def test_predictions_are_not_written_into_another_runs_folder(data, run_dir, folds_only_dir, tmp_path):
    """They would replace that run's own predictions, which ensemble.py reads as the run's."""
    other = tmp_path / "other"
    shutil.copytree(folds_only_dir, other)
    with pytest.raises(SystemExit, match=r"--output_dir .*other is a folder of another run \(.*other\): its own "
                                         r"predictions would be replaced by those of .*; give a folder of their own"):
        inference.main(make_inference_cfg(data, run_dir, other))
    assert not (other / "eval_probs.csv").exists()
    for stage in ("fold0", "fold1"):  # where ensemble.py reads a fold's own predictions
        with pytest.raises(SystemExit, match=rf"--output_dir .*other/{stage} is a folder of another run \(.*other\)"):
            inference.main(make_inference_cfg(data, run_dir, other / stage))
        assert not (other / stage / "eval_probs.csv").exists()
    inference.main(make_inference_cfg(data, other / "fold0", other))  # its own fold: allowed
    assert (other / "eval_probs.csv").is_file()
    inference.main(make_inference_cfg(data, other / "fold0", other / "fold0"))
    assert (other / "fold0" / "eval_probs.csv").is_file()


def test_members_count_with_the_weights_given(data, folds_only_dir, tmp_path):
    """A run's folds share its weight equally, and predict_eval weighs members as told (normalised)."""
    paths = [folds_only_dir / "fold0" / "best.pt", folds_only_dir / "fold1" / "best.pt"]
    assert inference.run_members(folds_only_dir, "best", 0.5) == [(paths[0], 0.5), (paths[1], 0.5)]
    cfg = make_inference_cfg(data, paths, tmp_path)
    a, b = (inference.predict_eval([path], cfg, torch.device("cpu"))[0] for path in paths)
    weighted, _ = inference.predict_eval(paths, cfg, torch.device("cpu"), [3, 1])
    np.testing.assert_allclose(weighted, (3 * a + b) / 4, atol=1e-6)

def test_submission_matches_info_csv(data, predicted):
    path, out = predicted
    assert path == out / "submission.csv"
    submission = pd.read_csv(path)
    assert list(submission.columns) == ["ImageID", "ans"]
    assert submission["ImageID"].tolist() == info_ids(data)
    assert len(submission) == 6 * 7
    assert submission["ans"].dtype.kind == "i"
    assert submission["ans"].between(0, NUM_CLASSES - 1).all()


def test_eval_probs_table(data, predicted):
    _, out = predicted
    probs = pd.read_csv(out / "eval_probs.csv")
    assert list(probs.columns) == ["ImageID", *PROB_COLUMNS, "pred", *TASK_COLUMNS]
    assert probs["ImageID"].tolist() == info_ids(data)
    p = probs[PROB_COLUMNS].to_numpy()
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-5)
    np.testing.assert_array_equal(probs["pred"], p.argmax(1))
    np.testing.assert_array_equal(pd.read_csv(out / "submission.csv")["ans"], probs["pred"])
    mask, gender, band = decode_class(np.arange(NUM_CLASSES))
    for task, codes, n in (("mask", mask, 3), ("gender", gender, 2), ("age", band, 3)):
        columns = [f"{task}{k}" for k in range(n)]
        np.testing.assert_allclose(probs[columns].sum(axis=1), 1, atol=1e-5)
        for k in range(n):
            np.testing.assert_allclose(probs[f"{task}{k}"], p[:, codes == k].sum(1), atol=1e-6)


def test_output_dir_defaults_to_the_run(data, run_dir):
    path = inference.main(make_inference_cfg(data, run_dir, ""))
    assert path == run_dir / "submission.csv"
    assert (run_dir / "eval_probs.csv").is_file()
    assert pd.read_csv(path)["ImageID"].tolist() == info_ids(data)


def test_explicit_eval_dir(data, run_dir, tmp_path):
    inference.main(make_inference_cfg(data, run_dir, tmp_path / "a"))
    inference.main(make_inference_cfg(data, run_dir, tmp_path / "b", eval_dir=str(data / "sample" / "eval")))
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "a" / "eval_probs.csv"),
                                  pd.read_csv(tmp_path / "b" / "eval_probs.csv"))


def test_no_run_is_an_error(data, tmp_path):
    with pytest.raises(SystemExit, match="--run"):
        inference.main(make_inference_cfg(data, [], tmp_path))
    with pytest.raises(SystemExit, match=r"--run .*nope: no such run folder or checkpoint file"):
        inference.main(make_inference_cfg(data, tmp_path / "nope", tmp_path))


def test_the_record_of_a_prediction_names_its_models_and_settings(data, run_dir, predicted):
    """inference.json beside the submission: which checkpoints with which weights, the settings
    and the command, so a score can be traced to what made it."""
    _, out = predicted
    record = json.loads((out / "inference.json").read_text())
    assert record["models"] == [{"checkpoint": str(run_dir / "best.pt"), "weight": 1.0, "in_output_dir": None}]
    assert inference.inside(run_dir / "fold0" / "best.pt", run_dir) == "fold0/best.pt"  # a run's own, wherever it goes
    assert inference.inside(run_dir / "best.pt", out) is None
    assert record["config"]["tta"] == "flip" and record["config"]["checkpoint"] == "best"
    assert Path(record["eval_images"]) == data / "sample" / "eval" / "images"
    assert record["command"]


@pytest.mark.parametrize("flag, value", [("valid_batch_size", 0), ("num_workers", -3), ("cache_workers", -2)])
def test_numbers_a_loader_cannot_use_are_refused(data, run_dir, tmp_path, flag, value):
    with pytest.raises(SystemExit, match=f"--{flag} must be at least"):
        inference.main(make_inference_cfg(data, run_dir, tmp_path, **{flag: value}))



def test_an_unreadable_eval_image_stops_inference_naming_it(data, run_dir, tmp_path):
    """Every eval image needs an answer: a bad one is an error, never skipped (--skip_bad_images is train.py's)."""
    shutil.copytree(data / "sample" / "eval", tmp_path / "eval")
    bad = tmp_path / "eval" / "images" / info_ids(data)[5]
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(SystemExit, match=re.escape(str(bad))):
        inference.main(make_inference_cfg(data, run_dir, tmp_path / "out", eval_dir=str(tmp_path / "eval")))
    assert not (tmp_path / "out" / "submission.csv").exists()


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_a_first_stage_weight_of_0_or_1_is_a_share(data, tmp_path, weight):
    with pytest.raises(SystemExit, match="no such run folder"):  # checked after the share was accepted
        inference.main(make_inference_cfg(data, tmp_path / "none", tmp_path / "out", first_stage_weight=weight))

def test_an_output_dir_that_is_a_file_is_refused(data, run_dir, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="file is a file; give a folder"):
        inference.main(make_inference_cfg(data, run_dir, tmp_path / "file"))


# ---------------------------------------------------------------------------------------------
# TTA
def _loader(images):
    return DataLoader(TensorDataset(images, torch.zeros(len(images), dtype=torch.long)), batch_size=3)


def test_tta_flip_is_the_mean_of_the_image_and_its_mirror():
    torch.manual_seed(0)
    model = create_model({**default_config("train"), "model": "basemodel", "pretrained": False})
    device = torch.device("cpu")
    img = torch.randn(5, 3, 32, 24)
    symmetric = (img + img.flip(-1)) / 2
    assert torch.equal(symmetric, symmetric.flip(-1))
    none = train.predict(model, _loader(symmetric), device, tta="none")
    flip = train.predict(model, _loader(symmetric), device, tta="flip")
    assert none.shape == flip.shape == (5, NUM_CLASSES)
    np.testing.assert_allclose(flip, none, atol=1e-5)

    none = train.predict(model, _loader(img), device, tta="none")
    flip = train.predict(model, _loader(img), device, tta="flip")
    mirrored = train.predict(model, _loader(img.flip(-1)), device, tta="none")
    assert np.abs(flip - none).max() > 1e-4
    np.testing.assert_allclose(flip, (none + mirrored) / 2, atol=1e-6)
    crops = train.predict(model, _loader(img), device, tta="flip_crops")
    np.testing.assert_allclose(crops.sum(1), 1, atol=1e-5)
    assert np.abs(crops - flip).max() > 1e-6


def test_inference_tta_flip_changes_the_eval_probabilities(data, run_dir, predicted, tmp_path):
    inference.main(make_inference_cfg(data, run_dir, tmp_path, tta="none"))
    plain = pd.read_csv(tmp_path / "eval_probs.csv")[PROB_COLUMNS].to_numpy()
    flipped = pd.read_csv(predicted[1] / "eval_probs.csv")[PROB_COLUMNS].to_numpy()
    assert np.abs(plain - flipped).max() > 1e-5


# ---------------------------------------------------------------------------------------------
# Submission check
IDS = ["a.jpg", "b.jpg", "c.jpg"]


def submission(ids, ans=None):
    return pd.DataFrame({"ImageID": ids, "ans": ans if ans is not None else [0] * len(ids)})


def test_check_submission_accepts_a_valid_one():
    inference.check_submission(submission(IDS, [0, 17, 5]))


def test_check_submission_rejects_a_repeated_image_id():
    with pytest.raises(ValueError, match=r"repeats ImageID\(s\) \['b.jpg'\]"):
        inference.check_submission(submission(["a.jpg", "b.jpg", "b.jpg"]))


@pytest.mark.parametrize("bad", [18, -1])
def test_check_submission_rejects_classes_outside_0_17(bad):
    with pytest.raises(ValueError, match=str(bad)):
        inference.check_submission(submission(IDS, [0, bad, 1]))


def test_write_submission_refuses_a_bad_class(tmp_path):
    with pytest.raises(ValueError):
        inference.write_submission(IDS, [0, 1, 18], tmp_path)
    assert not (tmp_path / "submission.csv").exists()


# ---------------------------------------------------------------------------------------------
# Checkpoints: k-fold, last, refit
@pytest.fixture(scope="module")
def folds_only_dir(kfold_dir, tmp_path_factory):
    """The k-fold run without its refit model."""
    run = tmp_path_factory.mktemp("folds_only") / "kfold"
    shutil.copytree(kfold_dir, run, ignore=shutil.ignore_patterns("refit"))
    return run


def test_kfold_run_averages_its_folds(data, folds_only_dir, tmp_path):
    run = folds_only_dir
    assert inference.find_checkpoints(run) == [run / "fold0" / "best.pt", run / "fold1" / "best.pt"]
    inference.main(make_inference_cfg(data, run, tmp_path / "all"))
    folds = []
    for k in (0, 1):
        inference.main(make_inference_cfg(data, run / f"fold{k}", tmp_path / f"fold{k}"))
        folds.append(pd.read_csv(tmp_path / f"fold{k}" / "eval_probs.csv")[PROB_COLUMNS].to_numpy())
    averaged = pd.read_csv(tmp_path / "all" / "eval_probs.csv")
    np.testing.assert_allclose(averaged[PROB_COLUMNS].to_numpy(), (folds[0] + folds[1]) / 2, atol=1e-6)
    assert np.abs(folds[0] - folds[1]).max() > 1e-4  # two different models were averaged
    assert pd.read_csv(tmp_path / "all" / "submission.csv")["ImageID"].tolist() == info_ids(data)


def test_two_runs_are_averaged_too(data, run_dir, kfold_dir, tmp_path):
    before = (run_dir / "eval_probs.csv").read_bytes() if (run_dir / "eval_probs.csv").is_file() else None
    with pytest.raises(SystemExit, match="give --output_dir: by default the blend of 2 runs"):
        inference.main(make_inference_cfg(data, [run_dir, kfold_dir], ""))  # would overwrite run_dir's own
    assert ((run_dir / "eval_probs.csv").read_bytes() if (run_dir / "eval_probs.csv").is_file() else None) == before
    inference.main(make_inference_cfg(data, [run_dir, kfold_dir], tmp_path / "both"))
    inference.main(make_inference_cfg(data, run_dir, tmp_path / "one"))
    inference.main(make_inference_cfg(data, kfold_dir, tmp_path / "folds"))
    one = pd.read_csv(tmp_path / "one" / "eval_probs.csv")[PROB_COLUMNS].to_numpy()
    folds = pd.read_csv(tmp_path / "folds" / "eval_probs.csv")[PROB_COLUMNS].to_numpy()
    both = pd.read_csv(tmp_path / "both" / "eval_probs.csv")[PROB_COLUMNS].to_numpy()
    np.testing.assert_allclose(both, (one + folds) / 2, atol=1e-6)  # each run counts once, as in ensemble.py


def test_checkpoint_last_and_the_refit_folder(data, run_dir, kfold_dir, folds_only_dir, tmp_path):
    assert inference.find_checkpoints(run_dir, "last") == [run_dir / "last.pt"]
    assert inference.find_checkpoints(kfold_dir, "last") == [kfold_dir / "fold0" / "last.pt",
                                                            kfold_dir / "fold1" / "last.pt"]
    # a run with a refit model (trained on everybody) predicts with it, not with its folds
    assert inference.run_members(kfold_dir, "best", 0.5) == [(kfold_dir / "refit" / "best.pt", 1.0)]
    inference.main(make_inference_cfg(data, kfold_dir, tmp_path / "run"))
    inference.main(make_inference_cfg(data, kfold_dir / "refit", tmp_path / "refit"))
    inference.main(make_inference_cfg(data, folds_only_dir, tmp_path / "folds"))
    run, refit, folds = (pd.read_csv(tmp_path / name / "eval_probs.csv") for name in ("run", "refit", "folds"))
    assert refit["ImageID"].tolist() == info_ids(data)
    pd.testing.assert_frame_equal(run, refit)
    assert np.abs(refit[PROB_COLUMNS].to_numpy() - folds[PROB_COLUMNS].to_numpy()).max() > 1e-4  # another model
    with pytest.raises(SystemExit, match="best.pt"):
        inference.find_checkpoints(tmp_path / "nothing")


def test_an_unfinished_refit_is_refused(kfold_dir, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(kfold_dir, partial)
    (partial / "refit" / "summary.json").unlink()
    with pytest.raises(SystemExit, match=r"refit model .*refit is not finished; finish it with python train.py --resume .*, "
                                         r"or predict with the models trained with validation: python inference.py "
                                         r"--run \S*partial/fold0 \S*partial/fold1 --output_dir DIR"):
        inference.run_members(partial, "best", 0.5)


def test_one_checkpoint_of_a_refit_run_does_not_replace_the_runs_predictions(data, kfold_dir, tmp_path):
    """By default a checkpoint's predictions go beside it, into the run folder, whose own ones
    (ensemble.py reads them as the run's) come from the refit model."""
    run = tmp_path / "run"
    shutil.copytree(kfold_dir, run)
    (run / "fold0" / "best.pt").rename(run / "best.pt")  # a single-fold run with --refit: RUN/best.pt beside RUN/refit/
    with pytest.raises(SystemExit, match=r"give --output_dir: by default the predictions of .*best.pt would replace "
                                         r"those of the run .*run, which come from its refit model"):
        inference.main(make_inference_cfg(data, run / "best.pt", ""))
    assert not (run / "eval_probs.csv").exists()


def test_an_unfinished_kfold_run_is_not_averaged(kfold_dir, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(kfold_dir, partial)
    (partial / "fold1" / "summary.json").unlink()  # fold 1 stopped mid-training
    with pytest.raises(SystemExit, match=f"{partial} is an unfinished k-fold run \\(fold1 not finished\\)"):
        inference.find_checkpoints(partial)
    shutil.rmtree(partial / "fold1")  # fold 1 never started
    with pytest.raises(SystemExit, match="fold1 not finished"):
        inference.find_checkpoints(partial)
    assert inference.find_checkpoints(partial / "fold0") == [partial / "fold0" / "best.pt"]
    (partial / "config.json").write_text("{")  # damaged: named, not a traceback
    with pytest.raises(SystemExit, match="partial/config.json: not valid JSON"):
        inference.run_members(partial, "best", 0.5)


def test_an_unfinished_single_run_is_refused_unless_its_checkpoint_is_given(data, run_dir, kfold_dir, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(run_dir, partial, ignore=shutil.ignore_patterns("summary.json"))  # stopped mid-training
    for checkpoint in ("best", "last"):
        with pytest.raises(SystemExit, match=re.escape(
                f"{partial} is an unfinished run (no summary.json); finish it with python train.py --resume "
                f"{partial}, or pass {partial / f'{checkpoint}.pt'} to --run")):
            inference.find_checkpoints(partial, checkpoint)
    with pytest.raises(SystemExit, match="unfinished run"):
        inference.main(make_inference_cfg(data, partial, tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    assert inference.find_checkpoints(partial / "best.pt") == [partial / "best.pt"]
    inference.main(make_inference_cfg(data, partial / "best.pt", tmp_path / "as_it_is"))
    assert pd.read_csv(tmp_path / "as_it_is" / "submission.csv")["ImageID"].tolist() == info_ids(data)
    folds = tmp_path / "kfold"
    shutil.copytree(kfold_dir, folds)
    (folds / "fold0" / "summary.json").unlink()
    with pytest.raises(SystemExit, match=re.escape(f"--resume {folds}, or pass {folds / 'fold0' / 'best.pt'}")):
        inference.find_checkpoints(folds / "fold0")  # a fold resumes with its run


@pytest.mark.parametrize("damage", ["empty", "truncated", "text", "state_dict"])
def test_a_damaged_or_foreign_checkpoint_is_named(data, run_dir, tmp_path, damage):
    path = tmp_path / "best.pt"
    good = (run_dir / "best.pt").read_bytes()
    if damage == "state_dict":
        torch.save(torch.load(run_dir / "best.pt", weights_only=True)["model"], path)
    else:
        path.write_bytes({"empty": b"", "truncated": good[:1000], "text": b"not a checkpoint\n"}[damage])
    with pytest.raises(D.DataError, match=re.escape(f"{path}: not a")):
        inference.load_model(path, "cpu")
    with pytest.raises(SystemExit, match=re.escape(f"error: {path}: not a")):
        inference.main(make_inference_cfg(data, path, tmp_path / "out"))


def test_weights_that_do_not_fit_the_saved_config_are_named(data, run_dir, tmp_path):
    ckpt = torch.load(run_dir / "best.pt", weights_only=True)
    first, *_, last = ckpt["model"]
    message = f"{tmp_path / 'best.pt'}: the weights do not match its saved config (model basemodel)"
    for change in ({first: torch.zeros(3)}, {last: None}):
        weights = {k: v for k, v in {**ckpt["model"], **change}.items() if v is not None}
        torch.save({**ckpt, "model": weights}, tmp_path / "best.pt")
        with pytest.raises(D.DataError, match=re.escape(message)):
            inference.load_model(tmp_path / "best.pt", "cpu")
        with pytest.raises(SystemExit, match=re.escape(f"error: {message}")):
            inference.main(make_inference_cfg(data, tmp_path / "best.pt", tmp_path / "out"))


# ---------------------------------------------------------------------------------------------
# Pseudo labels
def test_write_pseudo_labels_keeps_confident_images(tmp_path):
    images = pd.DataFrame({"ImageID": ["a", "b", "c"], "image_path": [str(tmp_path / n) for n in "abc"]})
    probs = np.full((3, NUM_CLASSES), 0.01)
    probs[0, 4], probs[1, 9], probs[2, 17] = 0.95, 0.5, 0.9
    path = inference.write_pseudo_labels(images, probs, 0.9, tmp_path / "pseudo.csv")
    table = pd.read_csv(path)
    assert list(table.columns) == ["path", "class"]
    assert table["path"].tolist() == [str(tmp_path / "a"), str(tmp_path / "c")]
    assert table["class"].tolist() == [4, 17]


def test_soft_pseudo_labels_keep_the_probabilities_and_read_back(tmp_path):
    images = pd.DataFrame({"ImageID": ["a.png", "b.png"], "image_path": [str(tmp_path / n) for n in ("a.png", "b.png")]})
    for path in images["image_path"]:
        Image.new("RGB", (4, 4)).save(path)
    probs = np.random.default_rng(0).dirichlet(np.ones(NUM_CLASSES), size=2)
    probs[1] = 0.02
    probs[1, 7] = 1 - 0.02 * (NUM_CLASSES - 1)
    path = inference.write_pseudo_labels(images, probs, 0.5, tmp_path / "pseudo.csv", soft=True)
    table = pd.read_csv(path)
    assert list(table.columns) == ["path", "class", *PROB_COLUMNS] and table["class"].tolist() == [7]
    np.testing.assert_allclose(table[PROB_COLUMNS].to_numpy(), probs[1:])
    read_back = D.read_label_csv(path, "extra0")
    np.testing.assert_allclose(read_back[PROB_COLUMNS].to_numpy(), probs[1:], rtol=1e-6)
    assert read_back["image_path"].tolist() == [str((tmp_path / "b.png").resolve())]


def test_pseudo_label_round_trip(data, run_dir, predicted, tmp_path, capsys):
    top = pd.read_csv(predicted[1] / "eval_probs.csv")[PROB_COLUMNS].to_numpy().max(1)
    threshold = float(np.median(top))
    inference.main(make_inference_cfg(data, run_dir, tmp_path / "pseudo", tta="flip", pseudo_threshold=threshold))
    pseudo = pd.read_csv(tmp_path / "pseudo" / "pseudo_labels.csv")
    eval_probs = pd.read_csv(tmp_path / "pseudo" / "eval_probs.csv")
    confident = eval_probs[eval_probs[PROB_COLUMNS].max(axis=1) >= threshold]
    assert len(pseudo) == len(confident) >= 21  # the median keeps at least half of the 42 images
    eval_images = data / "sample" / "eval" / "images"
    assert pseudo["path"].tolist() == [str((eval_images / i).resolve()) for i in confident["ImageID"]]
    assert pseudo["class"].tolist() == confident["pred"].tolist()

    cfg = make_train_cfg(data, tmp_path / "runs", extra_data=[str(tmp_path / "pseudo" / "pseudo_labels.csv")])
    extra_run, _ = train.main(cfg)
    split = pd.read_csv(extra_run / "split.csv", dtype={"id": str})
    extra = split[split["id"].str.startswith("extra0:")]
    assert len(extra) == len(pseudo)
    assert (extra["fold"] == -1).all() and (extra["source"] == "extra0").all()
    assert sorted(extra["id"]) == sorted(f"extra0:{Path(p).stem}" for p in pseudo["path"])
    classes = dict(zip((Path(p).stem for p in pseudo["path"]), pseudo["class"]))
    for rec in extra.itertuples():
        _, gender, band = decode_class(classes[rec.id.split(":", 1)[1]])
        assert (rec.gender, rec.age_band) == (gender, band)
    own = split[~split["id"].str.startswith("extra0:")]
    assert len(own) == 18 and (own["fold"] >= 0).all()
    # the split of the competition data is unchanged by the extra rows
    base_split = pd.read_csv(run_dir / "split.csv", dtype={"id": str})
    pd.testing.assert_frame_equal(own.reset_index(drop=True), base_split)

    valid = pd.read_csv(extra_run / "valid_probs.csv")
    assert not set(valid["image_path"]) & set(pseudo["path"])  # never validated on
    pd.testing.assert_series_equal(valid["image_path"], pd.read_csv(run_dir / "valid_probs.csv")["image_path"])
    images, people, _ = training_images_logged(run_dir)
    assert training_images_logged(extra_run) == (images + len(pseudo), people, len(pseudo))

    # predicted again there without a threshold: the labels stay (extra_run names them), with a warning
    before = (tmp_path / "pseudo" / "pseudo_labels.csv").read_text()
    inference.main(make_inference_cfg(data, run_dir, tmp_path / "pseudo", tta="none"))
    assert (tmp_path / "pseudo" / "pseudo_labels.csv").read_text() == before
    assert "pseudo_labels.csv is from an earlier prediction, not this one" in capsys.readouterr().out


@pytest.mark.parametrize("threshold", [1.5, -0.1])
def test_a_pseudo_threshold_that_is_not_a_probability_is_refused(data, run_dir, tmp_path, threshold):
    with pytest.raises(SystemExit, match=f"--pseudo_threshold is a probability, 0 .* to 1; got {threshold}"):
        inference.main(make_inference_cfg(data, run_dir, tmp_path / "out", pseudo_threshold=threshold))
    assert not (tmp_path / "out").exists()
