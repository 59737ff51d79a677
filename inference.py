"""Predict eval/info.csv with a trained run and write a submission.

    python inference.py --run runs/exp                    # submission.csv, eval_probs.csv, inference.json in the run
    python inference.py --run runs/kfold --tta flip_crops  # a k-fold run: its folds averaged, or its refit/ model
    python inference.py --run runs/exp --eval_dir data/eval --output_dir out
    python inference.py --run runs/exp --pseudo_threshold 0.95   # also pseudo_labels.csv

A run trained with --pseudo_threshold predicts with its pseudo-label stage (RUN/pseudo/) and its
first stage's models, half and half (--first_stage_weight; 0 for the stage alone); pass those
models (RUN/best.pt, RUN/fold0 RUN/fold1 ..., or RUN/refit) with an --output_dir of their own for
the first stage alone. --run also takes checkpoint files; several runs are averaged, each counting
once.

The model, image size, normalization and face crop come from the run's saved config; what is
chosen here is what to predict with (--run, --checkpoint, --first_stage_weight), where to read and
write, TTA, pseudo-labels (--pseudo_threshold, --pseudo_soft) and the loader (batch size, cache,
workers, device).
"""
import json
import logging
import re
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from config import default_config, parse_config
from dataset import (PROB_COLUMNS, DataError, build_transform, eval_folder, image_key, is_class,
                     make_dataset, num_folds, read_eval_images)
from model import create_model, finite_weights, task_probabilities
from train import (LOADER_MINIMUMS, autocast_for, check_at_least, check_not_a_file, check_pseudo_threshold,
                   is_stage_folder, load_checkpoint, predict, probs_table, resolve_device, saved_config, setup_logging,
                   write_csv_atomic, write_text_atomic)

log = logging.getLogger("mask")


def final_stage(run_dir):
    """The folder of a run that predicts: its pseudo-label stage pseudo/ when it has one (the
    stage train.py --pseudo_threshold adds after the run's own models), else its first stage.
    A stage that is unfinished, or that the run was trained to have but never started (an
    interruption, or no eval image reaching the threshold), is refused rather than passed over
    for the first stage's models."""
    stage = Path(run_dir) / "pseudo"
    if not has_pseudo_stage(run_dir):
        return first_stage(run_dir)
    alone = f"predict with the first stage's models alone: python inference.py {first_stage_args(run_dir)}"
    if not stage.is_dir():  # interrupted before it, or no eval image reached the threshold: resuming stops there again
        raise SystemExit(f"error: the pseudo-label stage {stage} of a run trained with --pseudo_threshold was not "
                         f"started; its train.log says why: if it was interrupted, python train.py --resume {run_dir}; "
                         f"if no eval image reached the threshold, {alone} (add --pseudo_threshold P to label them "
                         f"at a lower one)")
    if not (stage / "summary.json").is_file():
        raise SystemExit(f"error: the pseudo-label stage {stage} of a run trained with --pseudo_threshold is not "
                         f"finished; finish it with python train.py --resume {run_dir} (its train.log says why it "
                         f"stopped), or {alone}")
    return stage


def has_pseudo_stage(run_dir):
    """The run has, or was trained to have, a pseudo-label stage in pseudo/."""
    return (Path(run_dir) / "pseudo").is_dir() or saved_config(run_dir).get("pseudo_threshold", 0) > 0


def first_stage(run_dir):
    """The run's own models: refit/ when the run has one (trained on every person after the
    folds: the model --refit is for), else the run itself (its folds). They label the eval images
    for a pseudo-label stage, and predict for a run without one. An unfinished refit is refused."""
    refit = Path(run_dir) / "refit"
    if not refit.is_dir():
        return Path(run_dir)
    if not (refit / "summary.json").is_file():
        raise SystemExit(f"error: the refit model {refit} is not finished; finish it with python train.py --resume "
                         f"{run_dir}, or predict with the models trained with validation: python inference.py "
                         f"{first_stage_args(run_dir, refit=False)}")
    return refit


def first_stage_args(run_dir, refit=True):
    """The inference.py arguments that predict with a run's first-stage models alone, into a
    folder of their own: its refit/ model (unless refit is False), else its folds, else its best.pt."""
    run_dir = Path(run_dir)
    models = ([run_dir / "refit"] if refit and (run_dir / "refit").is_dir() else
              fold_dirs(run_dir) or [run_dir / "best.pt"])
    return f"--run {' '.join(map(str, models))} --output_dir DIR"


def run_members(run, checkpoint, first_stage_weight):
    """The checkpoints one --run predicts with and their weights, which sum to 1: its refit/
    model, else its models (its folds) equally, or, for a run with a pseudo-label stage, the
    stage's model with weight 1 - first_stage_weight and the models of its first stage sharing
    first_stage_weight (the blend is measured out of fold in BENCHMARKS.md, session 10)."""
    stage = final_stage(run)
    checkpoints = find_checkpoints(stage, checkpoint)
    own = [(path, 1 / len(checkpoints)) for path in checkpoints]
    if stage != Path(run) / "pseudo":
        if stage != Path(run):
            log.info("%s: predicting with its refit model %s (every person); for the models trained with validation: "
                     "python inference.py %s", run, stage, first_stage_args(run, refit=False))
        return own
    if first_stage_weight == 0:
        log.info("%s: predicting with its pseudo-label stage %s", run, stage)
        return own
    first = find_checkpoints(first_stage(run), checkpoint)
    log.info("%s: predicting with its pseudo-label stage %s (weight %g) and the %d model(s) of its first stage "
             "(weight %g)", run, stage, 1 - first_stage_weight, len(first), first_stage_weight)
    return [(path, weight * (1 - first_stage_weight)) for path, weight in own] + \
        [(path, first_stage_weight / len(first)) for path in first]


def find_checkpoints(run_dir, checkpoint="best"):
    """best.pt / last.pt of a finished run, or of each fold<k>/ of a k-fold run; a checkpoint file as it is."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        return [run_dir]
    if (run_dir / f"{checkpoint}.pt").is_file():
        if not (run_dir / "summary.json").is_file():  # a fold, refit/ or pseudo/ resumes with its run
            run = run_dir if (run_dir / "config.json").is_file() else run_dir.parent
            raise SystemExit(f"error: {run_dir} is an unfinished run (no summary.json); finish it with python train.py "
                             f"--resume {run}, or pass {run_dir / f'{checkpoint}.pt'} to --run to use it as it is")
        return [run_dir / f"{checkpoint}.pt"]
    folds = [fold / f"{checkpoint}.pt" for fold in fold_dirs(run_dir) if (fold / f"{checkpoint}.pt").is_file()]
    if not folds:
        raise SystemExit(f"error: no {checkpoint}.pt in {run_dir} or its fold folders")
    check_folds_finished(run_dir, folds)
    return folds


def fold_dirs(run_dir):
    """The fold<k>/ folders of a k-fold run, in fold order (a copy such as fold0_backup/ is not one)."""
    folds = [p for p in Path(run_dir).glob("fold*") if p.is_dir() and re.fullmatch(r"fold\d+", p.name)]
    return sorted(folds, key=lambda p: int(p.name[len("fold"):]))


def check_folds_finished(run_dir, checkpoints):
    """Refuse to average a k-fold run that was interrupted: a fold still training (no
    summary.json) or not started would silently weaken the ensemble."""
    saved = saved_config(run_dir)
    k = num_folds(saved["val_ratio"]) if saved.get("fold") == "all" and saved.get("val_ratio", 0) > 0 else 0
    names = sorted({p.parent.name for p in checkpoints} | {f"fold{i}" for i in range(k)})
    strays = [name for name in names if k and int(name[len("fold"):]) >= k]
    if strays:
        raise SystemExit(f"error: {run_dir}: {', '.join(strays)} {'is not a fold' if len(strays) == 1 else 'are not folds'} of its {k}-fold split "
                         f"(val_ratio {saved['val_ratio']}); move it out of the run folder")
    unfinished = [name for name in names if not (run_dir / name / "summary.json").is_file()]
    if unfinished:
        raise SystemExit(f"error: {run_dir} is an unfinished k-fold run ({', '.join(unfinished)} not finished); "
                         f"finish it with python train.py --resume {run_dir}, or pass the finished fold folders "
                         "to --run")


def load_model(path, device):
    """Rebuild a model from a checkpoint alone (its saved config), no ImageNet download. Keys
    added to args.json after the checkpoint was saved take their defaults, which keep the
    behaviour of older runs (e.g. face_crop off)."""
    ckpt = load_checkpoint(path)
    train_cfg = {**default_config("train"), **ckpt["config"]}
    model = create_model(train_cfg, pretrained=False)
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError) as e:  # PyTorch lists every mismatched tensor; the last line is kept
        raise DataError(f"{path}: the weights do not match its saved config (model {train_cfg['model']}): "
                        f"{str(e).strip().splitlines()[-1].strip()[:200]}")
    if not finite_weights(ckpt["model"]):
        raise DataError(f"{path}: its weights are not all finite numbers (the training diverged); train again with "
                        "a lower --lr")
    return model.to(device).eval(), train_cfg


def predict_eval(checkpoints, cfg, device, weights=None):
    """Mean 18-class probabilities of the checkpoints over eval/info.csv (weighted by `weights`,
    default equal), and the info table. The eval table and dataset are built once and shared by
    checkpoints with the same preprocessing (the folds of a k-fold run)."""
    weights = np.full(len(checkpoints), 1 / len(checkpoints)) if weights is None else np.asarray(weights) / sum(weights)
    total, inputs = 0, {}
    for path, weight in zip(checkpoints, weights):
        model, train_cfg = load_model(path, device)
        autocast, _ = autocast_for(device, train_cfg["amp"])  # as it was validated: --no-amp stays in float32
        eval_dir = str(Path(cfg["eval_dir"] or eval_folder(train_cfg)).resolve())  # one folder, however written
        if inputs and eval_dir not in {k[0] for k in inputs}:
            raise SystemExit(f"error: the runs predict different eval folders {sorted({k[0] for k in inputs} | {eval_dir})}; "
                             "give --eval_dir")
        key = (eval_dir, *(tuple(train_cfg[k]) for k in ("resize", "center_crop", "mean", "std")),
               train_cfg["face_crop"], train_cfg["face_margin"])
        if key not in inputs:
            images = read_eval_images(eval_dir)
            data_cfg = {**train_cfg, "cache_dir": cfg["cache_dir"], "num_workers": cfg["num_workers"],
                        "skip_bad_images": False}
            transform, batch_transform = build_transform("plain", train_cfg["resize"], train_cfg["mean"], train_cfg["std"])
            dataset = make_dataset(images, data_cfg, transform)
            loader = DataLoader(dataset, batch_size=cfg["valid_batch_size"],
                                num_workers=dataset.loader_workers(cfg, device))
            inputs[key] = images, loader, batch_transform
        images, loader, batch_transform = inputs[key]
        channels_last = train_cfg["channels_last"]
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        log.info("predicting %d images of %s with %s (tta %s)", len(images), eval_dir, path, cfg["tta"])
        total = total + weight * predict(model, loader, device, autocast, channels_last, cfg["tta"], batch_transform)
    return total, images


def check_submission(submission):
    """Every ImageID once and every class in 0..17 (a failure is a bug upstream)."""
    ids = submission["ImageID"]
    if ids.duplicated().any():
        raise ValueError(f"submission repeats ImageID(s) {ids[ids.duplicated()].unique()[:5].tolist()}")
    bad = submission["ans"][~is_class(submission["ans"])]
    if len(bad):
        raise ValueError(f"submission has classes outside 0..17: {bad.unique()[:5]}")


def eval_probs_table(image_ids, probs):
    """ImageID, p0..p17, pred, and the per-task probabilities (mask0-2, gender0-1, age0-2)."""
    table = probs_table(image_ids, probs)
    for task, p in task_probabilities(torch.from_numpy(probs)).items():
        for k in range(p.shape[1]):
            table[f"{task}{k}"] = p[:, k].numpy()
    return table


def write_submission(image_ids, preds, out_dir, name="submission.csv"):
    """ImageID,ans in the order given: info.csv's (inference reads it, ensemble checks it)."""
    submission = pd.DataFrame({"ImageID": list(image_ids), "ans": np.asarray(preds, dtype=int)})
    check_submission(submission)
    write_csv_atomic(submission, Path(out_dir) / name)
    return Path(out_dir) / name


def write_pseudo_labels(images, probs, threshold, path, soft=False):
    """Eval images whose top probability is at least threshold, as a label CSV (path,class, and
    with soft their probabilities p0..p17) that train.py takes with --extra_data."""
    confident = probs.max(1) >= threshold
    table = pd.DataFrame({"path": [image_key(p) for p in images["image_path"][confident]],
                          "class": probs.argmax(1)[confident]})
    if soft:
        table[PROB_COLUMNS] = probs[confident]
    write_csv_atomic(table, path)
    log.info("pseudo labels: %d of %d eval images at probability >= %.2f -> %s", len(table), len(probs), threshold, path)
    return path


def main(cfg):
    setup_logging()
    if not cfg["run"]:
        raise SystemExit("error: give a run folder with --run RUN")
    if not 0 <= cfg["first_stage_weight"] <= 1:
        raise SystemExit(f"error: --first_stage_weight is a share, 0 to 1; got {cfg['first_stage_weight']}")
    missing = [run for run in cfg["run"] if not Path(run).exists()]
    if missing:
        raise SystemExit(f"error: --run {' '.join(missing)}: no such run folder or checkpoint file")
    check_at_least(cfg, LOADER_MINIMUMS)
    first = Path(cfg["run"][0])
    out_dir = Path(cfg["output_dir"]) if cfg["output_dir"] else first.parent if first.is_file() else first
    check_not_a_file(out_dir)
    if not cfg["output_dir"] and len(cfg["run"]) > 1:
        raise SystemExit(f"error: give --output_dir: by default the blend of {len(cfg['run'])} runs would replace "
                         f"{out_dir}'s own predictions (which ensemble.py reads as that run's)")
    # a run folder, or its fold<k>/, refit/ or pseudo/ folder, holds predictions ensemble.py reads as that run's
    owner = out_dir.parent if is_stage_folder(out_dir) else out_dir if (out_dir / "config.json").is_file() else None
    if owner is not None and not any(inside(run, owner) is not None for run in cfg["run"]):
        raise SystemExit(f"error: --output_dir {out_dir} is a folder of another run ({owner}): its own predictions "
                         f"would be replaced by those of {' '.join(cfg['run'])}; give a folder of their own")
    if first.is_file() and not cfg["output_dir"]:
        predicting_stage = ("pseudo-label stage" if has_pseudo_stage(out_dir) else
                            "refit model" if (out_dir / "refit").is_dir() else "")
        if predicting_stage:
            raise SystemExit(f"error: give --output_dir: by default the predictions of {first} would replace those "
                             f"of the run {out_dir}, which come from its {predicting_stage}")
    check_pseudo_threshold(cfg["pseudo_threshold"])
    device = resolve_device(cfg["device"])
    # each run's weights sum to 1 and predict_eval normalises the total, so every run counts once
    members = [member for run in cfg["run"] for member in run_members(run, cfg["checkpoint"], cfg["first_stage_weight"])]
    try:
        probs, images = predict_eval([path for path, _ in members], cfg, device, [weight for _, weight in members])
    except DataError as e:  # bad input: the message names the file and the problem
        raise SystemExit(f"error: {e}")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(eval_probs_table(images["ImageID"], probs), out_dir / "eval_probs.csv")
    path = write_submission(images["ImageID"], probs.argmax(1), out_dir)
    if cfg["pseudo_threshold"] > 0:
        write_pseudo_labels(images, probs, cfg["pseudo_threshold"], out_dir / "pseudo_labels.csv", cfg["pseudo_soft"])
    elif (out_dir / "pseudo_labels.csv").is_file():  # kept: a training may name it in its --extra_data
        log.warning("%s is from an earlier prediction, not this one (no --pseudo_threshold)", out_dir / "pseudo_labels.csv")
    write_text_atomic(json.dumps({"command": shlex.join(sys.argv), "time": datetime.now(timezone.utc).isoformat(),
                                  "eval_images": str(Path(images["image_path"].iloc[0]).parent),
                                  "models": [{"checkpoint": str(path), "weight": weight, "in_output_dir": inside(path, out_dir)}
                                             for path, weight in members],
                                  "config": cfg}, indent=2), out_dir / "inference.json")
    log.info("wrote %s, %s and %s", path, out_dir / "eval_probs.csv", out_dir / "inference.json")
    return path


def inside(path, folder):
    """path relative to folder ('best.pt', 'fold0/best.pt') when it lies inside it, else None:
    what ensemble.py needs to tell a run's own models from others', wherever the run is moved."""
    try:
        return Path(path).resolve().relative_to(Path(folder).resolve()).as_posix()
    except ValueError:
        return None


if __name__ == "__main__":
    main(parse_config("inference", description=__doc__))
