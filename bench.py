"""make bench: quality and speed on maskbench (real faces, synthetic masks, competition layout).

    python bench.py --maskbench ../shared/maskbench                       # best, then baseline in the same time
    python bench.py --recipes best best+head=single best+pretrained=false --budget_minutes 5   # an ablation
    python bench.py --skip_training --size 384x512                        # loader throughput only
    python bench.py --speed_only --skip_loader --recipes best best+cache_workers=0 best+batch_size=64   # speed only

On a CUDA GPU it builds maskbench at full size (384x512), on the CPU at 192x256; either way the
recipes read their faces at their own input size (128x96) unless --cuda_input names another on
a GPU (192x256 scored lower out of fold with the recommended 4 epochs on an H100: BENCHMARKS.md).

Steps: build maskbench (once per size) -> decode loader throughput with and without the cache ->
for each recipe: model-only training throughput, train.py (a recipe without fixed epochs trains
until the time budget, stopped by max_train_minutes), inference.py, maskbench's score.py -> a
table appended to BENCHMARKS.md with the machine and the exact command. A recipe is
configs/<name>.json, optionally with overrides: best+head=single.
"""
import argparse
import csv
import hashlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from config import check_value, default_config, load_spec, read_config_file, suggest
from dataset import (NUM_CLASSES, DataError, build_transform, cache_readers, load_training_images, make_dataset,
                     num_folds, open_cache, read_valid_probs)
from loss import Criterion
from model import create_model
from train import autocast_for, build_optimizer, check_run_settings, fit, resolve_device, score

ROOT = Path(__file__).resolve().parent
# a budgeted recipe's epochs: the probe's estimate plus this margin (a 20-batch probe has
# overestimated a whole run's speed by up to ~25%); its max_train_minutes ends it on time. Not
# for schedules that span the whole run: cut short, they would never anneal
EPOCH_HEADROOM = 1.5
WHOLE_RUN_SCHEDULES = ("one_cycle", "cosine")
SPEED_IMAGES = 4480  # --speed_only: the pipeline is timed over about this many images, one fold's epoch of maskbench


def check_maskbench(folder):
    """Stop with a clear message, before any work, when the maskbench folder is not there."""
    missing = [name for name in ("build.py", "score.py", "faces.csv", "faces") if not (folder / name).exists()]
    if missing:
        raise SystemExit(f"error: {folder} is not a maskbench folder (no {', '.join(missing)}); give its path with "
                         "--maskbench (make bench MASKBENCH=path)")


def build_maskbench(maskbench, size, out, limit=0):
    """Build maskbench into out once; build.py writes build_info.json last, so a folder without
    it is a build that was cut short, which is refused rather than measured."""
    record = out / "bench_source.json"  # which maskbench it was built from
    if (out / "build_info.json").is_file():
        source = maskbench_source(maskbench)
        built_from = json.loads(record.read_text()) if record.is_file() else source  # older builds did not record it
        if built_from["faces_csv_sha1"] != source["faces_csv_sha1"]:  # the same faces at another path are the same
            raise SystemExit(f"error: {out} was built from other faces ({built_from['maskbench']}/faces.csv differs from "
                             f"{maskbench}/faces.csv); give another --out, or delete {out} to build it again")
        record.write_text(json.dumps(source))
        return
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: {out} holds an unfinished maskbench build (no build_info.json, which build.py "
                         "writes last); delete the folder and run again")
    try:
        subprocess.run([sys.executable, str(maskbench / "build.py"), "--faces", str(maskbench / "faces"),
                        "--csv", str(maskbench / "faces.csv"), "--out", str(out), "--size", size,
                        "--workers", str(os.cpu_count()), *(["--limit", str(limit)] if limit else [])], check=True)
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"error: maskbench's build.py stopped with exit status {e.returncode} (its message is above)")
    record.write_text(json.dumps(maskbench_source(maskbench)))


def maskbench_source(maskbench):
    return {"maskbench": str(maskbench), "faces_csv_sha1": hashlib.sha1((maskbench / "faces.csv").read_bytes()).hexdigest()}


def detect_faces_once(data, recipes):
    """Run detect_faces.py on the train and eval folders when a recipe crops faces and they
    have no faces.csv yet."""
    folders = [data / "train", data / "eval"]
    if any(recipe_config(r).get("face_crop") for r in recipes) and not all((f / "faces.csv").is_file() for f in folders):
        subprocess.run([sys.executable, "detect_faces.py", "--face_dirs", *map(str, folders)], check=True, cwd=ROOT)


def detection_rates(data):
    """'train: found/total (rate), eval: ...' for the folders that have a faces.csv."""
    rates = []
    for name in ("train", "eval"):
        if (data / name / "faces.csv").is_file():
            found = pd.read_csv(data / name / "faces.csv")["found"]
            rates.append(f"{name} {found.sum()}/{len(found)} ({found.mean():.1%})")
    return ", ".join(rates)


def check_counts(table, data):
    """The dataset reads every person: its 18-class counts equal build_info.json's."""
    expected = json.loads((data / "build_info.json").read_text())["train_class_counts"]
    found = np.bincount(table["label"], minlength=18).tolist()
    if found != expected:
        raise SystemExit(f"error: class counts read {found} differ from build_info.json {expected}")
    print(f"read {table['id'].nunique()} people, {len(table)} images; class counts match build_info.json")


def loader_throughput(cfg, table, device, max_images=2000):
    """Images/s of the training loader (batch 32; cfg's workers decoding, the cache read as
    train.py reads it on this device) decoding every epoch vs reading the decode cache (built
    first; its build time is reported apart), for the plain and the light augmentation preset,
    counted from the first batch on; the wait for the first batch (worker start-up) is reported
    apart, as it is paid once per epoch, not per image. Returns {preset: {uncached, cached,
    speedup, cache_build_s (None: the cache was there before), uncached_startup_s, cached_startup_s,
    cache_readers}}."""
    table = table.iloc[:max_images]
    start = time.time()
    cache_file, _, _ = open_cache(table["image_path"].tolist(), cfg)  # built now, unless an earlier bench did
    build_s = time.time() - start if cache_file.stat().st_mtime >= start else None
    result, readers = {}, cache_readers(cfg, device)
    for preset in ("plain", "light"):
        transform, _ = build_transform(preset, cfg["resize"], cfg["mean"], cfg["std"])  # the workers' part
        row = {"cache_build_s": build_s, "cache_readers": readers}
        for name, cache_dir in (("uncached", ""), ("cached", cfg["cache_dir"])):
            dataset = make_dataset(table, {**cfg, "cache_dir": cache_dir}, transform)
            loader = DataLoader(dataset, batch_size=32, shuffle=True, num_workers=dataset.loader_workers(cfg, device))
            start, seen = time.time(), 0
            for images, *_ in loader:  # timed from the first batch: worker start-up is reported apart
                if seen == 0:
                    first, first_size, row[f"{name}_startup_s"] = time.time(), images.size(0), time.time() - start
                seen += images.size(0)
            row[name] = (seen - first_size) / (time.time() - first)
        row["speedup"] = row["cached"] / row["uncached"]
        result[preset] = row
    return result


def model_throughput(cfg, device):
    """Training images/s of the model alone (random inputs, forward + backward + step), with the
    mixed precision and cuDNN autotuning train.py uses on CUDA (where a step takes milliseconds,
    so it times more of them)."""
    steps = 50 if device.type == "cuda" else 6
    torch.backends.cudnn.benchmark = not cfg["deterministic"]
    autocast, _ = autocast_for(device, cfg["amp"])
    model = create_model(cfg).to(device).train()
    criterion, optimizer = Criterion(cfg), build_optimizer(cfg, model)
    memory_format = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    if cfg["channels_last"]:
        model = model.to(memory_format=memory_format)
    images = torch.randn(cfg["batch_size"], 3, *cfg["resize"], device=device).contiguous(memory_format=memory_format)
    labels = torch.randint(0, 18, (cfg["batch_size"],), device=device)
    ages = torch.full((cfg["batch_size"],), 40.0, device=device)
    for step in range(steps + 2):  # two warm-up steps
        if step == 2:
            if device.type == "cuda":
                torch.cuda.synchronize()  # the warm-up's queued GPU work is not timed
            start = time.time()
        with autocast():
            loss, _ = criterion(model(images), labels, ages)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * cfg["batch_size"] / (time.time() - start)


def pipeline_throughput(cfg, table, device, out_dir, batches=20):
    """Training images/s of the whole pipeline (train.fit: loader, batch transform, model step)
    on the first batches of the real data, second of two epochs: what sizes a budgeted recipe's
    epochs (and so its learning-rate schedule). The cache it opens is the one train.py then
    reuses (same images, size and crop)."""
    cache = open_cache(table["image_path"].tolist(), cfg) if cfg["cache_dir"] else None
    shutil.rmtree(out_dir, ignore_errors=True)  # fit would resume a finished probe instead of timing one
    fit({**cfg, "epochs": 2}, out_dir, table.iloc[:cfg["batch_size"] * batches], None, device, cache)
    return float(pd.read_csv(out_dir / "metrics.csv")["train_images_per_s"].iloc[-1])


def recipe_config(recipe):
    """configs/<name>.json plus '+key=value' overrides (values parsed as JSON, else strings)."""
    name, *overrides = recipe.split("+")
    path = ROOT / "configs" / f"{name}.json"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in (ROOT / "configs").glob("*.json")))
        raise SystemExit(f"error: recipe {recipe}: there is no configs/{name}.json (there are: {names})")
    spec = load_spec()
    cfg = read_config_file(path, list(spec))  # checks the file's keys and values, as train.py --config does
    for item in overrides:
        if "=" not in item:
            raise SystemExit(f"error: recipe {recipe}: override {item!r} is not key=value")
        key, value = item.split("=", 1)
        if key not in spec:
            raise SystemExit(f"error: recipe {recipe}: unknown key {key}{suggest(key, list(spec), flag='')}")
        if isinstance(spec[key]["default"], str):  # fold=0 stays the string "0"
            cfg[key] = value
        else:
            try:
                cfg[key] = json.loads(value)
            except json.JSONDecodeError:
                cfg[key] = value
        check_value(key, cfg[key], spec[key], f"recipe {recipe}")  # stops bench now, not after the build
    return cfg


def recipe_training(recipe, args, data, device):
    """A recipe's training overrides (with --cuda_input on a GPU), its TTA, and the full training
    config bench runs it with."""
    train_overrides = recipe_config(recipe)
    tta = train_overrides.pop("tta", args.tta)  # an inference key: the recipe's TTA
    if device.type == "cuda" and args.cuda_input and "+resize=" not in recipe:
        width, height = (int(v) for v in args.cuda_input.split("x"))
        train_overrides["resize"] = [height, width]
    cfg = {**default_config("train"), **train_overrides, "data_dir": str(data / "train"),
           "cache_dir": str(args.cache_dir), "num_workers": args.num_workers}
    return train_overrides, tta, cfg


def recipe_speed(recipe, cfg, table, device, out_dir, images=SPEED_IMAGES):
    """Training images/s of a recipe's model alone and of its whole pipeline over `images`
    training images (an epoch's worth by default), with the cache readers its loader uses here."""
    batches = max(1, images // cfg["batch_size"])
    return {"recipe": recipe, "input": "x".join(str(v) for v in cfg["resize"][::-1]), "batch_size": cfg["batch_size"],
            "images": min(batches * cfg["batch_size"], len(table)), "cache_readers": cache_readers(cfg, device),
            "model_images_per_s": model_throughput(cfg, device),
            "pipeline_images_per_s": pipeline_throughput(cfg, table, device, out_dir, batches=batches)}


def run_name(recipe):
    return recipe.replace("=", "-").replace("+", "__")


def run_recipe(recipe, args, data, out, device):
    """Train (unless a finished run with the same recipe settings is there), predict and score
    one recipe. A recipe with fold 'all' trains every fold (the budget is shared among them),
    predicts with the mean of the folds and reports the out-of-fold validation F1."""
    train_overrides, tta, cfg = recipe_training(recipe, args, data, device)
    model_ips = model_throughput(cfg, device)
    folds = num_folds(cfg["val_ratio"]) if cfg["fold"] == "all" else 1
    epochs = train_overrides.get("epochs") or args.epochs
    run_dir = out / data.name / run_name(recipe)  # each maskbench build (--size, --limit) keeps its own runs
    config_file = run_dir.parent / f"{run_dir.name}.json"  # what it is trained with: the recipe on that build
    data_dir = cfg["data_dir"]
    if not epochs:  # trained for the budget: the time limit stops it, the probe sizes its schedule
        budget = args.budget_minutes or 30  # 30 minutes when the first recipe has no epochs of its own
        train_overrides["max_train_minutes"] = round(budget / folds, 3)
        sized = json.loads(config_file.read_text()) if config_file.is_file() else {}
        if sized.get("epochs") and sized == {**train_overrides, "epochs": sized["epochs"], "data_dir": data_dir}:
            epochs = sized["epochs"]  # sized by an earlier bench's probe: its finished run is reused, not retrained
        else:
            table = load_training_images(cfg)
            n_train = round(len(table) * (1 - cfg["val_ratio"]))  # per fold
            pipeline_ips = pipeline_throughput(cfg, table, device, out / "probes" / run_name(recipe))
            headroom = 1.0 if cfg["scheduler"] in WHOLE_RUN_SCHEDULES else EPOCH_HEADROOM
            epochs = max(1, math.ceil(headroom * budget * 60 * pipeline_ips / (n_train * folds)))
            print(f"{recipe}: training pipeline {pipeline_ips:.1f} images/s -> up to {epochs} epoch(s) of {n_train} "
                  f"images x {folds} fold(s), stopped at {budget:.1f} min")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    recipe_cfg = {**train_overrides, "epochs": epochs, "data_dir": data_dir}
    config_file.write_text(json.dumps(recipe_cfg, indent=2))
    # explicit folders, so SM_* environment variables (args.json) cannot send a run elsewhere
    common = ["--cache_dir", str(args.cache_dir), "--num_workers", str(args.num_workers), "--eval_dir", str(data / "eval")]
    last_stage = ("pseudo" if cfg["pseudo_threshold"] else "refit" if cfg["refit"] and cfg["val_ratio"] > 0 else "")
    finished = run_dir / last_stage / "summary.json" if last_stage else run_dir / ("oof_probs.csv" if folds > 1 else "summary.json")
    same_recipe = same_training(run_dir, recipe_cfg)
    done = same_recipe and finished.is_file()
    # a finished run of the same recipe settings is reused, an unfinished one continued (its finished
    # folds kept), so an interrupted bench resumes
    if same_recipe and not done:
        subprocess.run([sys.executable, "train.py", "--resume", str(run_dir), "--num_workers", str(args.num_workers)],
                       check=True, cwd=ROOT)
    elif not done:
        subprocess.run([sys.executable, "train.py", "--config", str(config_file), "--data_dir", data_dir,
                        "--output_dir", str(run_dir), "--overwrite", *common], check=True, cwd=ROOT)
    if not (done and predicted_with(run_dir, tta)):
        subprocess.run([sys.executable, "inference.py", "--run", str(run_dir), "--output_dir", str(run_dir),
                        "--tta", tta, *common], check=True, cwd=ROOT)
    scored = subprocess.run([sys.executable, str(args.maskbench / "score.py"), "--answers", str(data / "eval" / "answers.csv"),
                             "--submission", str(run_dir / "submission.csv"), "--json"],
                            check=True, stdout=subprocess.PIPE, text=True)  # its errors reach the terminal
    metrics = json.loads(scored.stdout)
    detail = data / "eval" / "answers_detail.csv"  # each image's person; maskbench's build.py writes it
    metrics["macro_f1_sd"] = people_resampled_sd(detail, run_dir / "submission.csv") if detail.is_file() else math.nan
    histories = {path.parent: csv_rows(path) for path in sorted(run_dir.glob("**/metrics.csv"))}
    history = [row for rows in histories.values() for row in rows]
    later = {stage: histories.pop(run_dir / stage, None) for stage in ("refit", "pseudo")}  # after the run's own models
    epochs_run = "/".join(str(n) for n in sorted({len(rows) for rows in histories.values()}))  # a time limit can stop early
    epochs_run += "".join(f" + {stage} {len(rows)}" for stage, rows in later.items() if rows)
    if folds > 1:
        oof = read_valid_probs(run_dir / "oof_probs.csv")
        valid_f1 = score(oof["label"], oof["pred"])["f1"]
    else:  # None without validation (val_ratio 0)
        valid_f1 = json.loads((run_dir / "summary.json").read_text())["best_valid_f1"]
    return {"recipe": recipe + (" (reused)" if done else ""), "tta": tta, "epochs": f"{folds} x {epochs_run}" if folds > 1 else epochs_run,
            "input": "x".join(str(v) for v in cfg["resize"][::-1]),
            "train_minutes": sum(float(r["train_seconds"]) for r in history) / 60, "model_images_per_s": model_ips,
            "train_images_per_s": float(np.median([float(r["train_images_per_s"]) for r in history])),
            "valid_f1": math.nan if valid_f1 is None else valid_f1,
            "valid_images_per_s": median_or_nan([float(r["valid_images_per_s"]) for r in history if r.get("valid_images_per_s")]),
            **metrics}


def median_or_nan(values):
    return float(np.median(values)) if values else math.nan  # none: a run without validation


# settings that place or log a run, not what it learns
PLACE_KEYS = ("output_dir", "overwrite", "resume", "name", "model_dir", "cache_dir", "num_workers", "device", "report",
              "wandb_project", "log_interval", "eval_dir")


def same_training(run_dir, recipe_cfg):
    """Whether run_dir holds a run of exactly this training: every setting train.py resolved for
    it (args.json's defaults under the recipe) equals the run's config.json, keys added to
    args.json since counting as their defaults; only PLACE_KEYS may differ."""
    if not (run_dir / "config.json").is_file():
        return False
    defaults = default_config("train")
    saved, wanted = {**defaults, **json.loads((run_dir / "config.json").read_text())}, {**defaults, **recipe_cfg}
    return all(saved.get(key) == value for key, value in wanted.items() if key not in PLACE_KEYS)


def predicted_with(run_dir, tta):
    """Whether the run's submission.csv was predicted with this test-time augmentation
    (inference.json, written beside it, records it)."""
    record = run_dir / "inference.json"
    return ((run_dir / "submission.csv").is_file() and record.is_file()
            and json.loads(record.read_text())["config"]["tta"] == tta)


def people_resampled_sd(answers_detail, submission, draws=1000, seed=0):
    """Standard deviation of the 18-class macro F1 over `draws` redraws of the eval people with
    replacement: how much another set of people built the same way could move the score (0.034
    for the recommended recipe; BENCHMARKS.md session 20)."""
    truth = pd.read_csv(answers_detail, usecols=["ImageID", "ans", "person"])
    table = truth.merge(pd.read_csv(submission).rename(columns={"ans": "pred"}), on="ImageID", validate="1:1")
    return float(resampled_macro_f1(table["ans"], table["pred"], table["person"], draws, seed).std())


def resampled_macro_f1(true, pred, person, draws, seed):
    """The macro F1 of each redraw of the people (multinomial counts, numpy seed). Each person's
    true positives, false positives and false negatives per class are counted once, so a redraw
    is a weighted sum of them."""
    true, pred, person = np.asarray(true), np.asarray(pred), pd.factorize(np.asarray(person))[0]
    hit = true == pred
    counts = np.zeros((3, person.max() + 1, NUM_CLASSES))  # true positives, false positives, false negatives
    np.add.at(counts[0], (person[hit], true[hit]), 1)
    np.add.at(counts[1], (person[~hit], pred[~hit]), 1)
    np.add.at(counts[2], (person[~hit], true[~hit]), 1)
    people = counts.shape[1]
    weights = np.random.default_rng(seed).multinomial(people, np.full(people, 1 / people), size=draws)
    tp, fp, fn = (weights @ c for c in counts)
    present = tp + fp + fn > 0  # as sklearn's macro average: the classes that are true or predicted
    return np.where(present, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0).sum(1) / present.sum(1)


def csv_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def machine():
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    allocator = ("tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else
                 f"glibc with GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']}" if os.environ.get("GLIBC_TUNABLES") else
                 "default allocator")  # 1.1-2.6x apart in speed (BENCHMARKS.md, session 21)
    return f"{os.cpu_count()} CPU cores ({cpu}), {gpu}, torch {torch.__version__}, {allocator}"


def write_report(args, loader, results, faces, speeds=()):
    if not (loader or results or speeds):
        print("bench: nothing was measured, so nothing is recorded")
        return
    lines = [f"\n## bench {time.strftime('%Y-%m-%d %H:%M')}\n", f"- machine: {machine()}",
             f"- command: `{shlex.join([Path(sys.executable).name, *sys.argv])}`",
             f"- data: maskbench built at {args.size}{f' from {args.limit} people' if args.limit else ''}; "
             "the reader's 18-class counts match build_info.json"]
    if faces:
        lines += [f"- faces found by detect_faces.py (MTCNN, two passes): {faces}"]
    lines[-1] += "\n"
    if loader:
        readers = next(iter(loader.values()))["cache_readers"]
        readers = f"{readers} workers" if readers else "the main process"
        lines += [f"| loader, batch 32 ({args.num_workers} workers decoding, {readers} reading the cache) "
                  "| decoding every epoch (images/s) | decode cache (images/s) "
                  "| speed-up | first batch after (s), decoding / cache |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {preset} augmentation | {r['uncached']:.0f} | {r['cached']:.0f} | {r['speedup']:.1f}x | "
                  f"{r['uncached_startup_s']:.2f} / {r['cached_startup_s']:.2f} |" for preset, r in loader.items()]
        build_s = next(iter(loader.values()))["cache_build_s"]
        lines += ["\nThe cache was already there (built by an earlier bench).\n" if build_s is None else
                  f"\nThe cache was built once in {build_s:.1f} s.\n"]
    if speeds:
        lines += ["| recipe | input WxH | batch | cache read by | model-only img/s | training pipeline img/s | "
                  "pipeline / model |", "| --- " * 7 + "|"]
        for r in speeds:
            readers = f"{r['cache_readers']} workers" if r["cache_readers"] else "the main process"
            lines.append(f"| {r['recipe']} | {r['input']} | {r['batch_size']} | {readers} | "
                         f"{r['model_images_per_s']:.1f} | {r['pipeline_images_per_s']:.1f} | "
                         f"{r['pipeline_images_per_s'] / r['model_images_per_s']:.0%} |")
        lines += [f"\nmodel-only: random inputs, forward + backward + step; training pipeline: train.py's loop on the "
                  f"first {speeds[0]['images']} training images (second of two epochs, loader start-up included).\n"]
    if results:
        lines += ["| recipe | input WxH | epochs | train min | macro F1 (sd over people) | accuracy | mask F1 | gender F1 "
                  "| age F1 | valid F1 | train img/s | model-only img/s | inference img/s |", "| --- " * 13 + "|"]
        for r in results:
            lines.append(f"| {r['recipe']} | {r['input']} | {r['epochs']} | {r['train_minutes']:.1f} | "
                         f"{r['macro_f1']:.4f} ({r['macro_f1_sd']:.3f}) | {r['accuracy']:.4f} | {r['mask_f1']:.4f} | "
                         f"{r['gender_f1']:.4f} | {r['age_f1']:.4f} | "
                         f"{r['valid_f1']:.4f} | {r['train_images_per_s']:.1f} | {r['model_images_per_s']:.1f} | "
                         f"{r['valid_images_per_s']:.1f} |")
        lines += ["\ntrain min: training time (validation passes not included); valid F1: best epoch on the "
                  "validation fold, or out of fold for a k-fold recipe (epochs 'folds x epochs'), whose eval "
                  "prediction is the mean of its fold models; '+ pseudo N': then N epochs of the pseudo-label stage "
                  "(train min includes them), whose model makes the eval prediction with the first stage's models "
                  "(first_stage_weight of inference.py); valid F1 is the first stage's; '+ refit N': then a model trained "
                  "N epochs on every training person, which alone makes the eval prediction; (reused): a finished run "
                  "of an earlier bench with the same settings, whose training and inference speeds are that run's. sd over people: the standard "
                  "deviation of the macro F1 when the eval people are drawn again with replacement (1,000 draws), "
                  "how far another set of people could move it; a difference between recipes well inside it is "
                  "not resolved by this eval set."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.record:
        with open(args.record, "a") as f:
            f.write(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--maskbench", type=Path, default=ROOT.parent / "shared" / "maskbench", help="maskbench folder (build.py, faces/, score.py)")
    parser.add_argument("--size", default="", help="maskbench image size WxH to build; default 384x512 (full size) "
                                                   "on a CUDA GPU, 192x256 on the CPU")
    parser.add_argument("--cuda_input", default="",
                        help="on a CUDA GPU: the model input WxH of every recipe that does not set +resize= "
                             "itself (e.g. 192x256); empty: the recipes' own")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out", help="where data, caches and runs go")
    parser.add_argument("--record", default=str(ROOT / "BENCHMARKS.md"),
                        help="file the report is appended to (default: this project's BENCHMARKS.md); '' only prints it")
    parser.add_argument("--recipes", nargs="*", default=["best", "baseline"], help="configs/<name>.json[+key=value...]")
    parser.add_argument("--budget_minutes", type=float, default=0,
                        help="training time of a recipe that does not fix its epochs; 0: the measured training time "
                             "of the first recipe (30 if it has no epochs of its own), so the default baseline gets "
                             "the time the recommended recipe took")
    parser.add_argument("--epochs", type=int, default=0,
                        help="fixed epochs instead of the time budget, for the recipes that set none (best.json sets "
                             "4: give best+epochs=N to change it)")
    parser.add_argument("--tta", default=default_config("inference")["tta"], choices=load_spec()["tta"]["choices"],
                        help="test-time augmentation of a recipe that sets none (configs/best.json and baseline.json "
                             "set their own)")
    parser.add_argument("--limit", type=int, default=0, help="build maskbench from this many people only (quick loader measurements)")
    parser.add_argument("--num_workers", type=int, default=default_config("train")["num_workers"],
                        help="loader processes decoding images (the kit's --num_workers), for the loader measurement and every run")
    parser.add_argument("--skip_loader", action="store_true", help="do not measure the loader")
    parser.add_argument("--skip_training", action="store_true", help="only build and measure the loader")
    parser.add_argument("--speed_only", action="store_true",
                        help="per recipe, only its training speed instead of a training run: the model alone and "
                             "the whole pipeline (loader, cache readers, model) over about an epoch of images")
    args = parser.parse_args(argv)
    if args.speed_only and args.skip_training:
        parser.error("--speed_only times the recipes' training, which --skip_training leaves out; give one of them")
    if args.size and not re.fullmatch(r"[1-9][0-9]*x[1-9][0-9]*", args.size):
        parser.error(f"--size must be WxH, e.g. 192x256, got {args.size!r}")
    for flag in ("limit", "num_workers", "epochs", "budget_minutes"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag} must be at least 0, got {getattr(args, flag)}")
    if args.record and not Path(args.record).parent.is_dir():
        parser.error(f"--record {args.record}: there is no folder {Path(args.record).parent}")
    args.out, args.maskbench = args.out.resolve(), args.maskbench.resolve()  # the scripts run in this folder
    check_maskbench(args.maskbench)
    for recipe in args.recipes:  # a misspelt recipe, or settings train.py refuses, stop here, not after the build
        check_run_settings({**default_config("train"), **recipe_config(recipe)})
    args.size = args.size or ("384x512" if torch.cuda.is_available() else "192x256")
    args.out.mkdir(parents=True, exist_ok=True)
    args.cache_dir = args.out / "cache"
    data = args.out / "data" / (args.size + (f"_limit{args.limit}" if args.limit else ""))
    build_maskbench(args.maskbench, args.size, data, args.limit)
    width, height = (int(v) for v in args.size.split("x"))
    cfg = {**default_config("train"), "data_dir": str(data / "train"), "resize": [height, width],
           "cache_dir": str(args.cache_dir), "num_workers": args.num_workers, "val_ratio": 0.2}
    table = load_training_images(cfg)
    check_counts(table, data)
    device = resolve_device("auto")
    loader = None if args.skip_loader else loader_throughput(cfg, table, device)
    results, speeds = [], []
    if not args.skip_training:
        detect_faces_once(data, args.recipes)
    try:  # an interrupted or failed bench still reports the recipes it finished
        if args.speed_only:
            for recipe in args.recipes:
                _, _, recipe_cfg = recipe_training(recipe, args, data, device)
                speeds.append(recipe_speed(recipe, recipe_cfg, load_training_images(recipe_cfg), device,
                                           args.out / "probes" / f"speed_{run_name(recipe)}"))
        elif not args.skip_training:
            for recipe in args.recipes:
                results.append(run_recipe(recipe, args, data, args.out / "runs", device))
                args.budget_minutes = args.budget_minutes or results[0]["train_minutes"]
    except subprocess.CalledProcessError as e:  # the script printed why
        raise SystemExit(f"error: {shlex.join(map(str, e.cmd))} stopped (exit {e.returncode}); its message is above")
    finally:
        write_report(args, loader, results, detection_rates(data), speeds)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the recipes finished before it are reported (main's finally)
        raise SystemExit(130)
    except DataError as e:  # bad input (e.g. a --limit too small to split): the message names the file
        raise SystemExit(f"error: {e}")
