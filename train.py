"""Train a mask / gender / age classifier; everything about the run lands in one run folder.

    python train.py                                   # args.json defaults
    python train.py --model efficientnet-b0 --resize 256 192 --epochs 10 --name b0
    python train.py --config my.json --fold all        # k-fold: every fold, out-of-fold probabilities
    python train.py --resume runs/b0                   # continue an interrupted run
    python train.py --help                            # every key, with its default

Run folder (runs/<name>/, or --output_dir): config.json, train.log, split.csv, metrics.csv,
best.pt, last.pt, valid_probs.csv, summary.json (with --fold all: one fold<k>/ folder per fold
and oof_probs.csv; with --refit: refit/ trained on every person; with --pseudo_threshold:
pseudo/, the model trained on every person plus the eval images in its labels.csv).
"""
import contextlib
import io
import json
import logging
import math
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, WeightedRandomSampler

from config import default_config, parse_config
from dataset import (NUM_CLASSES, PROB_COLUMNS, DataError, build_transform, check_decode_errors, check_training_folder,
                     class_balanced_weights, count_people, decode_class, decode_errors, eval_folder, image_key,
                     load_training_images, make_dataset, mix_batch, num_folds, open_cache, read_eval_images,
                     read_extra, read_valid_probs, split_train_valid)
from loss import Criterion, check_criterion_settings
from model import check_model_settings, class_probabilities, create_model, finite_weights, load_torch_file

log = logging.getLogger("mask")


# ---------------------------------------------------------------------------------------------
# Run folder, logging, device
def make_run_dir(cfg):
    """runs/<name>, or name2, name3... if taken; or exactly --output_dir: refused if not empty,
    unless --overwrite and it holds a run (config.json and train.log). The old run is then moved
    aside (replaced_run), so nothing of it, such as a last.pt to resume from, mixes with the new
    one; settle_run deletes it once the new run has a checkpoint, or puts it back if the new one
    stops before its first (bad data, Ctrl-C, a crash)."""
    if cfg["output_dir"]:
        run_dir = Path(cfg["output_dir"])
        check_not_a_file(run_dir)
        if run_dir.exists() and any(run_dir.iterdir()):
            if not cfg["overwrite"]:
                raise SystemExit(f"error: {run_dir} is not empty; pass --overwrite to replace the run in it")
            if run_dir.is_symlink():
                raise SystemExit(f"error: {run_dir} is a symbolic link; give the folder it points to as --output_dir")
            if not all((run_dir / name).is_file() for name in ("config.json", "train.log")):
                raise SystemExit(f"error: {run_dir} is not a run folder (no config.json and train.log); "
                                 "not overwriting it")
            old = replaced_run(run_dir)
            if old.exists() and not has_checkpoint(run_dir):  # a replacement killed before its first checkpoint
                shutil.rmtree(run_dir)
            else:
                shutil.rmtree(old, ignore_errors=True)
                run_dir.rename(old)
    else:
        base = Path(cfg["model_dir"]) / cfg["name"]
        run_dir, n = base, 2
        while run_dir.exists():
            run_dir, n = base.with_name(f"{base.name}{n}"), n + 1
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def check_not_a_file(folder):
    if folder.exists() and not folder.is_dir():
        raise SystemExit(f"error: --output_dir {folder} is a file; give a folder")


def replaced_run(run_dir):
    """Where --overwrite keeps the old run of run_dir until the new one has a checkpoint."""
    run_dir = Path(os.path.abspath(run_dir))
    return run_dir.with_name(f".{run_dir.name}.replaced")


def has_checkpoint(run_dir):
    return any(Path(run_dir).rglob("*.pt"))


def settle_run(run_dir, discard_untrained):
    """When a run stops or finishes: with a checkpoint, the run it replaced (--overwrite) is
    deleted; without one, the run is deleted (discard_untrained, or when it replaced one) and
    the run it replaced is put back. Returns whether the run was deleted."""
    old = replaced_run(run_dir)
    if has_checkpoint(run_dir):
        if old.exists():
            shutil.rmtree(old)
            log.info("deleted the run this one replaced (--overwrite)")
        return False
    if not (discard_untrained or old.exists()):
        return False
    setup_logging()  # close the run's log file before deleting it
    shutil.rmtree(run_dir)
    if old.exists():
        old.rename(run_dir)
        log.info("%s holds the run it held before again", run_dir)
    return True


def setup_logging(log_file=None):
    """Console at INFO; the run folder's log file at DEBUG (it also holds confusion matrices)."""
    for handler in log.handlers[:]:
        handler.close()
        log.removeHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(logging.INFO)
    console.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(console)
    if log_file:
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)


def resolve_device(name):
    """auto: CUDA when there is a GPU, else the CPU; a named device is checked before any work."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"error: --device {name!r} is not a device (auto, cpu, cuda, cuda:1, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name}: no CUDA GPU is usable here; pass --device auto or cpu")
    return device


def autocast_for(device, enabled):
    """Mixed precision on CUDA: bf16 on GPUs with native bf16 (compute capability 8.0+, Ampere
    on; no scaler needed), else fp16 with a gradient scaler. torch.cuda.is_bf16_supported() is
    not the test: it also says yes to GPUs that only emulate bf16 (V100, T4), which are slower."""
    if device.type != "cuda" or not enabled:
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_states():
    """The global RNG states as plain data (checkpoints load with weights_only=True). Training
    reseeds every epoch from (seed, epoch), so resuming does not need them; they are kept so
    a checkpoint records everything about where it stopped."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
            "python": random.getstate()}


def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: an interrupted write never corrupts `path`
    and leaves no temporary file behind."""
    write_atomic(lambda tmp: torch.save(obj, tmp), path)


def write_atomic(write, path):
    """Call write(temporary path), then rename it to path: an interruption leaves the old file or
    none, never a half-written one."""
    tmp = Path(f"{path}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path, map_location="cpu", keys=("model", "config")):
    """A checkpoint this kit saved, or a DataError naming the file and what is wrong with it
    (unreadable as load_torch_file says, or lacking `keys`)."""
    ckpt = load_torch_file(path, "checkpoint", map_location)
    missing = [key for key in keys if not isinstance(ckpt, dict) or key not in ckpt]
    if missing:
        raise DataError(f"{path}: not a checkpoint written by train.py (it has no {', '.join(missing)})")
    return ckpt


def write_text_atomic(text, path):
    """Write to a temporary file, then rename: a file whose presence marks a finished step
    (summary.json) is never left half-written."""
    write_atomic(lambda tmp: tmp.write_text(text), path)


def write_csv_atomic(table, path):
    write_text_atomic(table.to_csv(index=False), path)


# ---------------------------------------------------------------------------------------------
# Metrics and prediction
def score(labels, preds):
    """18-class macro F1 (the competition metric), accuracy, and per-task macro F1."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    result = {"f1": f1_score(labels, preds, average="macro"), "accuracy": accuracy_score(labels, preds)}
    for task, true, pred in zip(("mask", "gender", "age"), decode_class(labels), decode_class(preds)):
        result[f"{task}_f1"] = f1_score(true, pred, average="macro")
    return result


@torch.no_grad()
def predict(model, loader, device, autocast=contextlib.nullcontext, channels_last=False, tta="none", preprocess=None):
    """18-class probabilities for every item of a loader, in order. preprocess: the batch
    transform of the loader's images (dataset.build_transform), None for ready float batches.
    tta: none; flip (average with the mirrored image); flip_crops (also a 90% centre crop,
    plain and mirrored)."""
    if tta not in ("none", "flip", "flip_crops"):
        raise ValueError(f"tta '{tta}' is not none, flip or flip_crops")
    model.eval()
    probs = []
    for images, *_ in loader:
        images = images.to(device, non_blocking=True)
        if preprocess is not None:
            images = preprocess(images)
        views = [images]
        if tta in ("flip", "flip_crops"):
            views.append(images.flip(-1))
        if tta == "flip_crops":
            h, w = images.shape[-2:]
            dh, dw = h // 20, w // 20
            crop = torch.nn.functional.interpolate(images[..., dh:h - dh, dw:w - dw], size=(h, w), mode="bilinear")
            views += [crop, crop.flip(-1)]
        batch = 0
        for view in views:
            if channels_last:
                view = view.contiguous(memory_format=torch.channels_last)
            with autocast():
                batch = batch + class_probabilities(model(view))
        probs.append((batch / len(views)).cpu())
    return torch.cat(probs).numpy()


def probs_table(ids, probs, id_column="ImageID"):
    table = pd.DataFrame(probs, columns=PROB_COLUMNS)
    table.insert(0, id_column, list(ids))
    table["pred"] = probs.argmax(1)
    return table


# ---------------------------------------------------------------------------------------------
# Training
def build_optimizer(cfg, model):
    """backbone_lr_scale != 1 puts the backbone in its own parameter group at lr * scale (the heads
    first, at lr, so metrics.csv's lr is the configured one); every scheduler scales both groups."""
    params = [p for p in model.parameters() if p.requires_grad]  # --freeze_blocks leaves some out
    if cfg["backbone_lr_scale"] != 1.0:
        backbone = [p for p in model.backbone.parameters() if p.requires_grad]
        in_backbone = {id(p) for p in backbone}
        params = [{"params": [p for p in params if id(p) not in in_backbone], "lr": cfg["lr"]},
                  {"params": backbone, "lr": cfg["lr"] * cfg["backbone_lr_scale"]}]
    if cfg["optimizer"] == "SGD":
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    if cfg["optimizer"] in ("Adam", "AdamW"):
        return getattr(torch.optim, cfg["optimizer"])(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    raise ValueError(f"optimizer '{cfg['optimizer']}' is not SGD, Adam or AdamW")


def build_scheduler(cfg, optimizer, steps_per_epoch, epochs):
    """Stepped once per batch, so every schedule is smooth and resumes mid-run exactly."""
    name, total = cfg["scheduler"], max(steps_per_epoch * epochs, 1)
    sched = torch.optim.lr_scheduler
    if name == "none":
        return sched.LambdaLR(optimizer, lambda step: 1.0)
    if name == "step":
        return sched.StepLR(optimizer, step_size=steps_per_epoch * cfg["lr_decay_step"], gamma=cfg["lr_gamma"])
    if name == "cosine":
        return sched.CosineAnnealingLR(optimizer, T_max=total)
    if name == "cosine_restarts":
        return sched.CosineAnnealingWarmRestarts(optimizer, T_0=steps_per_epoch * cfg["lr_decay_step"])
    if name == "one_cycle":
        if total < 4:  # too few steps to rise and fall: OneCycleLR would spend them far below the peak
            return sched.LambdaLR(optimizer, lambda step: 1.0)
        peaks = [group["lr"] for group in optimizer.param_groups]
        # a warm-up of exactly one step (4 steps in all) makes OneCycleLR divide by zero
        # Adam's beta1 cycles 0.95 -> 0.85 -> 0.95 against the learning rate (the 1cycle policy; the
        # recommended recipe was measured with it); SGD keeps the --momentum it was given
        return sched.OneCycleLR(optimizer, max_lr=peaks, total_steps=total, pct_start=0.25 if total != 4 else 0.5,
                                cycle_momentum=cfg["optimizer"] != "SGD")
    raise ValueError(f"scheduler '{name}' is not none, step, cosine, cosine_restarts or one_cycle")


def make_loader(dataset, cfg, epoch, device):
    """A training loader whose order, sampling and worker seeds depend only on (seed, epoch),
    so a resumed run sees exactly the batches the uninterrupted run would have seen."""
    generator = torch.Generator().manual_seed(cfg["seed"] * 1000 + epoch)
    sampler = (WeightedRandomSampler(class_balanced_weights(dataset.labels), len(dataset), generator=generator)
               if cfg["balanced_sampler"] else None)
    return DataLoader(dataset, batch_size=cfg["batch_size"], shuffle=sampler is None, sampler=sampler,
                      generator=generator, num_workers=dataset.loader_workers(cfg, device), pin_memory=device.type == "cuda",
                      drop_last=len(dataset) > cfg["batch_size"])


def train_one_epoch(model, loader, batch_transform, criterion, optimizer, scheduler, scaler, device, cfg, autocast, epoch,
                    ema=None):
    from tqdm import tqdm

    model.train()
    totals, seen, start = {}, 0, time.time()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg['epochs']}", leave=False, disable=not sys.stderr.isatty())
    for step, (images, labels, ages, soft) in enumerate(bar):
        images, labels, ages, soft = (t.to(device, non_blocking=True) for t in (images, labels, ages, soft))
        images = batch_transform(images)
        if cfg["channels_last"]:
            images = images.contiguous(memory_format=torch.channels_last)
        mixed = cfg["mix"] != "none" and torch.rand(1).item() < cfg["mix_prob"]
        with autocast():
            if mixed:
                images, perm, lam = mix_batch(images, cfg["mix"], cfg["mix_alpha"])
                outputs = model(images)
                loss_a, parts = criterion(outputs, labels, ages, soft)
                loss_b, _ = criterion(outputs, labels[perm], ages[perm], soft[perm])
                loss = lam * loss_a + (1 - lam) * loss_b
            else:
                outputs = model(images)
                loss, parts = criterion(outputs, labels, ages, soft)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if cfg["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        n = images.size(0)
        seen += n
        for key, value in {"loss": loss.detach(), **parts}.items():
            totals[key] = totals.get(key, 0.0) + value * n
        if (step + 1) % cfg["log_interval"] == 0:
            log.debug("epoch %d step %d/%d loss %.4f lr %.2e", epoch + 1, step + 1, len(loader),
                      loss.item(), optimizer.param_groups[0]["lr"])
            bar.set_postfix(loss=f"{loss.item():.3f}")
    elapsed = time.time() - start
    stats = {f"train_{k}": float(v) / max(seen, 1) for k, v in totals.items()}
    stats.update(train_images_per_s=seen / max(elapsed, 1e-9), train_seconds=elapsed)
    return stats


def log_confusion(labels, preds):
    """Per-task confusion matrices at INFO, the 18 x 18 one in the log file (DEBUG)."""
    for task, true, pred, n in zip(("mask", "gender", "age"), decode_class(labels), decode_class(preds), (3, 2, 3)):
        log.info("  %s confusion (rows true): %s", task, confusion_matrix(true, pred, labels=range(n)).tolist())
    matrix = confusion_matrix(labels, preds, labels=range(NUM_CLASSES))
    log.debug("18-class confusion (rows true, columns predicted):\n%s", "\n".join(" ".join(f"{v:4d}" for v in row) for row in matrix))


def time_limit_reached(cfg, history):
    """True when the next epoch, as long as the mean epoch so far, would end past
    max_train_minutes of training time (validation passes not counted); resumed runs count
    their earlier epochs, so the limit holds across an interruption."""
    if not cfg["max_train_minutes"] or not history:
        return False
    spent = sum(row["train_seconds"] for row in history)
    return spent + spent / len(history) > cfg["max_train_minutes"] * 60


def ema_of_floats(decay):
    """AveragedModel's update: an exponential moving average of the float tensors (weights,
    batch-norm statistics); integer buffers (batch-norm's batch counts) are copied, which
    torch's EMA would instead average and truncate."""
    average_floats = get_ema_multi_avg_fn(decay)

    def update(averaged, current, num_averaged):  # one group of tensors of one dtype
        if averaged[0].is_floating_point():
            average_floats(averaged, current, num_averaged)
        else:
            for tensor, value in zip(averaged, current):
                tensor.copy_(value)
    return update


def weight_average(cfg, model, total_steps):
    """The exponential moving average of the weights (and batch-norm statistics) that
    validation, best.pt and inference use when ema_decay > 0, or None. The decay is per step, so
    a run of few steps (small data) would end with much of its untrained starting weights still
    in the average: that is warned about with the decay that fits the run."""
    if not cfg["ema_decay"]:
        return None
    start_share = cfg["ema_decay"] ** total_steps
    if start_share > 0.05:
        log.warning("--ema_decay %s over this run's %d optimizer steps leaves %.0f%% of the starting weights in the "
                    "average it validates and saves; --ema_decay %.4f or lower leaves at most 5%%",
                    cfg["ema_decay"], total_steps, 100 * start_share, math.floor(0.05 ** (1 / total_steps) * 1e4) / 1e4)
    average = AveragedModel(model, multi_avg_fn=ema_of_floats(cfg["ema_decay"]), use_buffers=True)
    average.update_parameters(model)  # counts the starting weights, so the first step is averaged, not copied
    return average


def fit(cfg, out_dir, train_table, valid_table, device, cache=None):
    """Train one model into out_dir (resuming from out_dir/last.pt if present) and return its
    summary. valid_table None: no validation, the last epoch is kept as best.pt. cache: the
    decode cache of all the run's images (dataset.open_cache)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    size, mean, std = cfg["resize"], cfg["mean"], cfg["std"]
    skipped = []
    train_transform, train_batch_transform = build_transform(cfg["augmentation"], size, mean, std)
    valid_transform, valid_batch_transform = build_transform("plain", size, mean, std)
    train_set = make_dataset(train_table, cfg, train_transform, skipped, cache)
    valid_set = (make_dataset(valid_table, cfg, valid_transform, skipped, cache)
                 if valid_table is not None else None)
    if skipped:
        pd.DataFrame(skipped, columns=["path", "error"]).to_csv(out_dir / "skipped.csv", index=False)
        log.warning("skipped %d unreadable image(s); listed in %s", len(skipped), out_dir / "skipped.csv")
    log_datasets(out_dir, train_table, train_set, valid_table, valid_set, cfg, device)

    # seeded here, after the datasets: building the image cache draws from torch's global RNG
    # (DataLoader seeds), so seeding earlier gave a different initial model on a cold cache
    seed_everything(cfg["seed"])
    model = create_model(cfg).to(device)
    channels_last = cfg["channels_last"]
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    criterion = Criterion(cfg, train_set.labels)
    optimizer = build_optimizer(cfg, model)
    steps = len(make_loader(train_set, cfg, 0, device))
    scheduler = build_scheduler(cfg, optimizer, steps, cfg["epochs"])
    autocast, scaler = autocast_for(device, cfg["amp"])
    ema = weight_average(cfg, model, steps * cfg["epochs"])
    scored_model = ema.module if ema is not None else model  # validated, saved as best.pt, used by inference
    state = {"epoch": 0, "best_f1": -1.0, "best_epoch": 0, "bad_epochs": 0, "history": []}
    if (out_dir / "last.pt").exists():
        state = resume_fit(out_dir, model, ema, optimizer, scheduler, scaler, device)
    valid_loader = (DataLoader(valid_set, batch_size=cfg["valid_batch_size"],
                               num_workers=valid_set.loader_workers(cfg, device),
                               pin_memory=device.type == "cuda") if valid_set is not None else None)

    writer = tracker = None
    try:
        writer, tracker = tensorboard_writer(out_dir), wandb_run(cfg, out_dir)
        for epoch in range(state["epoch"], cfg["epochs"]):
            if should_stop(cfg, state, epoch):
                break
            seed_everything(cfg["seed"] * 1000 + epoch)  # dropout, mixing: a function of (seed, epoch)
            row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"]}
            row.update(train_one_epoch(model, make_loader(train_set, cfg, epoch, device), train_batch_transform,
                                       criterion, optimizer, scheduler, scaler, device, cfg, autocast, epoch, ema))
            check_not_diverged(scored_model, row, cfg)
            if valid_loader is not None:
                probs, valid_row = validate(scored_model, valid_loader, valid_set.labels, device, autocast, channels_last,
                                            valid_batch_transform)
                row.update(valid_row)
            improved = valid_loader is None or row["valid_f1"] > state["best_f1"]
            log_epoch(row, improved)
            if valid_loader is not None:
                log_confusion(valid_set.labels, probs.argmax(1))
            state["history"].append(row)
            state["epoch"] = epoch + 1
            if improved:
                state.update(best_f1=row.get("valid_f1"), best_epoch=epoch + 1, bad_epochs=0)
                save_atomic(model_checkpoint(scored_model, cfg, state), out_dir / "best.pt")
                if valid_loader is not None:
                    write_csv_atomic(probs_table(valid_set.paths, probs, "image_path").assign(label=valid_set.labels),
                                     out_dir / "valid_probs.csv")
            else:
                state["bad_epochs"] += 1
            save_atomic({**model_checkpoint(scored_model, cfg, state), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
                         "state": state, "trained_model": model.state_dict() if ema is not None else None,
                         "rng": rng_states()}, out_dir / "last.pt")
            write_csv_atomic(pd.DataFrame(state["history"]), out_dir / "metrics.csv")
            log_to_trackers(writer, tracker, row)
    except BaseException as e:  # the trackers learn how it ended before the run folder is settled
        close_trackers(writer, tracker, exit_code=interrupted_exit_code(e) if isinstance(e, KeyboardInterrupt) else 1)
        raise
    summary = {"best_epoch": state["best_epoch"], "best_valid_f1": state["best_f1"], "epochs_run": state["epoch"],
               **{k: v for k, v in state["history"][state["best_epoch"] - 1].items() if k.startswith("valid_")}}
    write_text_atomic(json.dumps(summary, indent=2), out_dir / "summary.json")
    close_trackers(writer, tracker, summary=summary)
    return summary


def check_not_diverged(model, row, cfg):
    """Stop a run whose weights are no longer finite numbers: it would validate, save and predict
    garbage (every image one class) without a word. Checked on the weights, not the loss: with
    fp16 the gradient scaler skips a step whose loss overflowed, and the run goes on."""
    if finite_weights(model.state_dict()):
        return
    kept = "the checkpoints of earlier epochs are kept" if row["epoch"] > 1 else "nothing was saved"
    raise SystemExit(f"error: the training diverged in epoch {row['epoch']}: its weights are no longer finite numbers "
                     f"(train loss {row['train_loss']:.4g}); {kept}. Train again with a lower --lr (this run: "
                     f"{cfg['lr']:g}) or --grad_clip 1")


def log_datasets(out_dir, train_table, train_set, valid_table, valid_set, cfg, device):
    people, labelled = count_people(train_table)
    log.info("%s: %d training images (%d people%s), %s", out_dir, len(train_set), people,
             f", {labelled} images of label CSVs" if labelled else "",
             f"{len(valid_set)} validation images ({valid_table['id'].nunique()} people)" if valid_set is not None
             else "no validation")
    log.info("loader: %d worker process(es) %s (0: the main process)", train_set.loader_workers(cfg, device),
             "decoding the images" if train_set.cache_file is None else "reading the decode cache")


def resume_fit(out_dir, model, ema, optimizer, scheduler, scaler, device):
    """Load out_dir/last.pt into the training objects; returns the training state it saved."""
    keys = ("model", "optimizer", "scheduler", "state") + (("trained_model",) if ema is not None else ())
    ckpt = load_checkpoint(out_dir / "last.pt", device, keys=keys)
    if ema is not None:  # last.pt's "model" is the average; the optimizer continues the trained weights
        model.load_state_dict(ckpt["trained_model"])
        ema.module.load_state_dict(ckpt["model"])
    else:
        model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    state = ckpt["state"]
    log.info("resuming %s after epoch %d%s", out_dir, state["epoch"], "" if state["best_f1"] is None else
             f" (best macro F1 {state['best_f1']:.4f} at epoch {state['best_epoch']})")
    return state


def should_stop(cfg, state, epoch):
    """Whether to stop before this epoch: max_train_minutes or patience. Checked before an epoch,
    not after saving one, so a resumed run stops too."""
    if time_limit_reached(cfg, state["history"]):
        log.info("stopping after epoch %d of %d: another epoch would pass max_train_minutes %s",
                 epoch, cfg["epochs"], cfg["max_train_minutes"])
        return True
    if cfg["patience"] and state["bad_epochs"] >= cfg["patience"]:
        log.info("early stop: no better validation macro F1 for %d epochs", cfg["patience"])
        return True
    return False


def validate(model, loader, labels, device, autocast, channels_last, preprocess):
    """One validation pass: the probabilities and the valid_* metrics of an epoch's row."""
    start = time.time()
    probs = predict(model, loader, device, autocast, channels_last, preprocess=preprocess)
    row = {"valid_images_per_s": len(labels) / max(time.time() - start, 1e-9)}
    row.update({f"valid_{k}": v for k, v in score(labels, probs.argmax(1)).items()})
    return probs, row


def log_epoch(row, improved):
    if "valid_f1" not in row:
        log.info("epoch %d: train loss %.4f", row["epoch"], row["train_loss"])
        return
    log.info("epoch %d: train loss %.4f | valid macro F1 %.4f acc %.4f | mask %.3f gender %.3f age %.3f%s",
             row["epoch"], row["train_loss"], row["valid_f1"], row["valid_accuracy"], row["valid_mask_f1"],
             row["valid_gender_f1"], row["valid_age_f1"], "  (best)" if improved else "")


def model_checkpoint(model, cfg, state):
    """What best.pt holds, and last.pt begins with: the weights, the config that rebuilds the
    model, the epoch and the best validation macro F1 so far."""
    return {"model": model.state_dict(), "config": cfg, "epoch": state["epoch"], "metric": state["best_f1"]}


def log_to_trackers(writer, tracker, row):
    """One epoch's row to TensorBoard and W&B (those in use), at the epoch's step. W&B commits it
    now: held back, the last row would land after the summary and replace its best-epoch values."""
    if writer is not None:
        for key, value in row.items():
            writer.add_scalar(key, value, row["epoch"])
    if tracker is not None:
        try:
            tracker.log(row, step=row["epoch"], commit=True)
        except Exception as e:  # the epoch is saved already; W&B going away must not stop the training
            log.warning("W&B did not take epoch %d: %s: %s", row["epoch"], type(e).__name__, e)


def close_trackers(writer, tracker, summary=None, exit_code=0):
    """Flush and close them; W&B also gets the summary (best epoch and its metrics) or, for a run
    that stopped, its exit code (130: Ctrl-C, 143: SIGTERM, 1: an error)."""
    if writer is not None:
        writer.close()
    if tracker is not None:
        try:
            if summary is not None:
                tracker.summary.update(summary)
            tracker.finish(exit_code=exit_code)
        except Exception as e:  # as above; and a stopping run keeps its own error
            log.warning("W&B did not close its run: %s: %s", type(e).__name__, e)


def tensorboard_writer(out_dir):
    """A TensorBoard writer into out_dir/tensorboard/ when the tensorboard package is installed,
    else None (metrics.csv holds the same numbers)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(out_dir / "tensorboard")


def wandb_run(cfg, out_dir):
    """The Weights & Biases run of the model trained into out_dir (--wandb_project), or None.
    Named by the run folder and the model's folder in it (exp, exp/fold0, exp/pseudo) and grouped
    by the run folder, so a k-fold run's models sit together; its id is kept in out_dir/wandb_id.txt,
    so a resumed model continues its W&B run instead of starting another."""
    if not cfg["wandb_project"]:
        return None
    wandb = import_wandb()
    run_dir = out_dir.parent if is_stage_folder(out_dir) else out_dir
    id_file = out_dir / "wandb_id.txt"
    if not id_file.is_file():
        write_text_atomic(secrets.token_hex(6), id_file)  # W&B ids: lowercase letters and digits
    name = run_dir.name if run_dir == out_dir else f"{run_dir.name}/{out_dir.name}"
    try:
        return wandb.init(project=cfg["wandb_project"], name=name, group=run_dir.name, id=id_file.read_text().strip(),
                          resume="allow", config=cfg, allow_val_change=True, dir=str(out_dir))  # a resume changes cfg's resume
    except Exception as e:  # no login, no network: the training goes on, metrics.csv keeps the numbers
        log.warning("W&B is not logging %s: %s (metrics.csv holds the same numbers; wandb login, or "
                    "WANDB_MODE=offline)", out_dir, error_summary(e))
        return None


def check_wandb(cfg):
    """With --wandb_project, before a run folder is made: wandb imports and, when it logs online,
    is logged in. Without a key wandb would otherwise stop at its login menu after the data is
    loaded, once per model (in a terminal it asks now; its "don't visualize" choice logs offline)."""
    if not cfg["wandb_project"]:
        return
    wandb = import_wandb()
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return
    try:
        wandb.login()
    except Exception as e:
        raise SystemExit(f"error: --wandb_project: W&B login failed ({error_summary(e)}); run wandb login (or set "
                         "WANDB_API_KEY), or set WANDB_MODE=offline to keep the logs on this machine")


def error_summary(e):
    """'Type: first line of the message' (at most 200 characters) of an error from another package."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def import_wandb():
    """The wandb package, or an error saying how to install it (checked before a run starts)."""
    try:
        import wandb
    except ImportError:
        raise SystemExit("error: --wandb_project needs the wandb package: pip install wandb (then wandb login, "
                         "or set WANDB_MODE=offline to keep the logs on this machine)")
    except Exception as e:  # installed but broken (say, a clash with another package's pins)
        raise SystemExit(f"error: --wandb_project: the wandb package does not import ({error_summary(e)})")
    return wandb


def is_stage_folder(folder):
    """Whether folder is a model folder inside a run folder: fold<k>/, refit/ or pseudo/."""
    folder = Path(folder)
    return bool(re.fullmatch(r"fold\d+|refit|pseudo", folder.name)) and (folder.parent / "config.json").is_file()


# ---------------------------------------------------------------------------------------------
def folds_to_train(cfg):
    """Validation fold of each model to train: [None] (no validation) for val_ratio 0, else the
    fold asked for or, for 'all', every one. Refuses a fold the split does not have."""
    if cfg["val_ratio"] == 0:
        return [None]
    if not 0 < cfg["val_ratio"] <= 0.5:
        raise SystemExit(f"error: --val_ratio must be 0 (no validation) or above 0 and at most 0.5 (the split has "
                         f"round(1 / val_ratio) folds, at least 2), got {cfg['val_ratio']}")
    k = num_folds(cfg["val_ratio"])
    if cfg["fold"] == "all":
        return list(range(k))
    if not str(cfg["fold"]).isdigit() or int(cfg["fold"]) >= k:
        raise SystemExit(f"error: --fold {cfg['fold']} is not a fold of this split: "
                         f"give 0..{k - 1} (val_ratio {cfg['val_ratio']} makes {k} folds) or 'all'")
    return [int(cfg["fold"])]


def train(cfg, run_dir, device):
    """Train the fold(s) a config asks for into run_dir; write the split, out-of-fold
    probabilities and the refit model; returns the per-fold summaries."""
    images = load_training_images(cfg)
    people = images.drop_duplicates("id")[["id", "source", "gender", "age", "age_band", "fold"]]
    check_same_split(run_dir / "split.csv", people)
    write_csv_atomic(people, run_dir / "split.csv")
    cache = open_cache(images["image_path"].tolist(), cfg) if cfg["cache_dir"] else None
    folds = folds_to_train(cfg)
    k = num_folds(cfg["val_ratio"]) if folds != [None] else 0
    if k and abs(1 / k - cfg["val_ratio"]) > 0.01:
        log.info("val_ratio %g makes %d folds: each validates on 1/%d of the people", cfg["val_ratio"], k, k)
    summaries = {}
    for fold in folds:
        out_dir = run_dir / f"fold{fold}" if cfg["fold"] == "all" and fold is not None else run_dir
        if (out_dir / "summary.json").exists():  # finished before an interruption
            summaries[fold] = json.loads((out_dir / "summary.json").read_text())
            continue
        train_table, valid_table = split_train_valid(images, fold, cfg["drop_ages"])
        summaries[fold] = fit(cfg, out_dir, train_table, valid_table, device, cache)
        log.info("fold %s: best validation macro F1 %s at epoch %d", fold, summaries[fold]["best_valid_f1"],
                 summaries[fold]["best_epoch"])
    if len(folds) > 1:
        oof = pd.concat([read_valid_probs(run_dir / f"fold{k}" / "valid_probs.csv") for k in folds], ignore_index=True)
        write_csv_atomic(oof, run_dir / "oof_probs.csv")
        oof_score = score(oof["label"], oof["pred"])
        log.info("out-of-fold macro F1 %.4f accuracy %.4f (%s)", oof_score["f1"], oof_score["accuracy"], run_dir / "oof_probs.csv")
    refit_dir = run_dir / "refit"
    if cfg["refit"] and folds != [None] and not (refit_dir / "summary.json").exists():  # not finished before
        # a refit interrupted mid-way continues with the epoch count it started with
        epochs = (load_checkpoint(refit_dir / "last.pt")["config"]["epochs"] if (refit_dir / "last.pt").exists()
                  else refit_epochs(summaries.values()))
        log.info("refit: training on every person for %d epochs into %s", epochs, refit_dir)
        all_train, _ = split_train_valid(images, None, cfg["drop_ages"])
        fit({**cfg, "epochs": epochs}, refit_dir, all_train, None, device, cache)
    if cfg["pseudo_threshold"] > 0:
        pseudo_stage(cfg, run_dir, device)
    return summaries


def refit_epochs(summaries):
    """The refit's epoch count: the folds' median best epoch, a half rounded up (2 and 3 give 3)."""
    return math.floor(np.median([summary["best_epoch"] for summary in summaries]) + 0.5)


def check_same_split(split_csv, people):
    """A resumed run (its split.csv exists) must find the people it was split into when it
    started, with the same labels and folds: otherwise the models trained before the interruption
    would be validated on people they trained on, and metrics.csv would mix two validation sets."""
    if not split_csv.is_file():
        return
    now = pd.read_csv(io.StringIO(people.to_csv(index=False)), dtype=str, keep_default_na=False)
    saved = pd.read_csv(split_csv, dtype=str, keep_default_na=False)
    if saved.equals(now):
        return
    both = saved.merge(now, on="id", how="outer", suffixes=("", " now"), indicator=True)
    removed = both.loc[both["_merge"] == "left_only", "id"].tolist()
    added = both.loc[both["_merge"] == "right_only", "id"].tolist()
    kept = both[both["_merge"] == "both"]
    changed = kept.loc[(kept[saved.columns[1:]].to_numpy() != kept[[f"{c} now" for c in saved.columns[1:]]].to_numpy())
                       .any(1), "id"].tolist()
    raise DataError(f"the training data changed since this run started ({split_csv} holds its split): "
                    f"{len(added)} person(s) added {added[:5]}, {len(removed)} removed {removed[:5]}, {len(changed)} "
                    f"with another label, source or fold {changed[:5]}. Resumed, the models trained so far would be "
                    "validated on other people, some of whom they trained on. Put the data back as it was, or start "
                    "a new run")


def saved_config(run_dir):
    """A run folder's config.json (empty where there is none: a checkpoint file, a fold or stage folder)."""
    path = Path(run_dir) / "config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: {path}: not valid JSON ({e})")


def check_data_paths(cfg):
    """The training folder and the extra data exist: a wrong path (or working directory) is named
    before a run folder is made."""
    try:
        check_training_folder(cfg["data_dir"])
    except DataError as e:
        raise SystemExit(f"error: {e}")
    missing = [path for path in cfg["extra_data"] if not Path(path).exists()]
    if missing:
        raise SystemExit(f"error: --extra_data {' '.join(missing)}: no such folder or label CSV")


def check_pseudo_threshold(threshold):
    if not 0 <= threshold <= 1:
        raise SystemExit(f"error: --pseudo_threshold is a probability, 0 (no pseudo-labels) to 1; got {threshold}")


def check_pseudo_settings(cfg):
    """The pseudo-label stage runs after all the training: its threshold, eval folder, images
    (decoded once; into the cache when there is one) and, with face_crop, the folder's faces.csv
    are checked before any, so a typo or a bad image does not surface an hour later."""
    check_pseudo_threshold(cfg["pseudo_threshold"])
    if cfg["pseudo_threshold"] > 0:
        try:
            paths = read_eval_images(eval_folder(cfg))["image_path"].tolist()
            check_decode_errors(paths, decode_errors(paths, cfg), skip_bad_images=False)  # and faces.csv with face_crop
        except DataError as e:
            raise SystemExit(f"error: the pseudo-label stage (--pseudo_threshold {cfg['pseudo_threshold']}) labels the "
                             f"eval images, and they cannot be read: {e} (set --eval_dir)")


def pseudo_stage(cfg, run_dir, device):
    """Pseudo-labelling, a step from the teams' reports: the run's first stage (its folds
    averaged, or its refit model; flip TTA) labels the eval images; those whose top probability reaches
    pseudo_threshold join every training person, and one more model trains on them into
    run_dir/pseudo/ for cfg epochs. It has no validation: the eval images have no true labels
    (BENCHMARKS.md measures the stage on held-out people). The labels go to pseudo/labels.csv
    (not pseudo_labels.csv, which inference.py --pseudo_threshold writes into the run folder);
    kept from an interrupted run, they are reused, so a resumed stage trains on the same labels."""
    from inference import find_checkpoints, first_stage, first_stage_args, predict_eval, write_pseudo_labels  # imports train
    if (run_dir / "pseudo" / "summary.json").is_file():  # finished before an interruption
        return
    labeller = first_stage(run_dir)
    labels_csv = run_dir / "pseudo" / "labels.csv"
    if not labels_csv.is_file():
        probs, images = predict_eval(find_checkpoints(labeller), {**cfg, "tta": "flip"}, device)
        if probs.max() < cfg["pseudo_threshold"]:
            raise DataError(f"no image of {eval_folder(cfg)} reaches --pseudo_threshold {cfg['pseudo_threshold']} (the "
                            f"highest top probability is {probs.max():.3f}). The models trained so far stay in {run_dir}; "
                            f"label with a lower threshold by hand: python inference.py {first_stage_args(run_dir)} "
                            f"--pseudo_threshold P, then python train.py --extra_data DIR/pseudo_labels.csv")
        given = {image_key(p) for table in read_extra(cfg["extra_data"]) for p in table["image_path"]}
        new = ~images["image_path"].map(image_key).isin(given).to_numpy()
        if not new.all():  # the user's --extra_data labels them already; labelling them twice is refused
            log.info("pseudo labels: %d eval image(s) already in --extra_data keep the labels given there", (~new).sum())
        labels_csv.parent.mkdir(exist_ok=True)
        write_pseudo_labels(images[new].reset_index(drop=True), probs[new], cfg["pseudo_threshold"], labels_csv,
                            cfg["pseudo_soft"])
    stage_cfg = {**cfg, "extra_data": [*cfg["extra_data"], str(labels_csv)]}
    images = load_training_images(stage_cfg)
    everyone, _ = split_train_valid(images, None, cfg["drop_ages"])
    cache = open_cache(images["image_path"].tolist(), cfg) if cfg["cache_dir"] else None
    log.info("pseudo-label stage: every training person plus the eval images of %s -> %s", labels_csv, run_dir / "pseudo")
    fit(stage_cfg, run_dir / "pseudo", everyone, None, device, cache)


# what --resume takes from the command line when given there: where and how it runs (another
# worker count changes the augmentation stream, so the result, as on another machine) and
# --wandb_project ('' stops W&B logging on a machine without wandb); any other setting keeps the
# run's own value
RESUME_SETTINGS = ("resume", "device", "num_workers", "cache_workers", "wandb_project")


def resumed_config(cfg, given, saved):
    """The run's saved config with the RESUME_SETTINGS that were given. Any other setting given
    with another value than the saved one (e.g. --epochs 20) would be silently dropped, so it is
    refused, naming the saved value. `given`: the keys set on the command line; None (a call
    from Python) counts those that differ from args.json's defaults."""
    defaults = default_config("train")
    run_cfg = {**defaults, **saved}  # keys added to args.json after the run was saved take their defaults
    if given is None:
        given = {key for key, value in cfg.items() if value != defaults[key]}
    ignored = [f"--{key} {json.dumps(cfg[key])} (the run has {json.dumps(run_cfg[key])})"
               for key in sorted(given) if key not in RESUME_SETTINGS and cfg[key] != run_cfg[key]]
    if ignored:
        raise SystemExit(f"error: --resume continues {cfg['resume']} with its saved config.json; it would ignore "
                         f"{', '.join(ignored)}. Drop them, or start a new run")
    return {**run_cfg, **{key: cfg[key] for key in RESUME_SETTINGS if key in given}}


# the smallest value of each number that a loader, training or inference needs, checked by check_at_least
LOADER_MINIMUMS = {"valid_batch_size": 1, "num_workers": 0, "cache_workers": -1}
TRAINING_MINIMUMS = {"epochs": 1, "batch_size": 1, "seed": 0, "weight_decay": 0, "max_train_minutes": 0,
                     "patience": 0, "lr_decay_step": 1, "age_sigma": 0, "focal_gamma": 0, "mix_alpha": 0,
                     "age_regression": 0, "f1_weight": 0, "mask_weight": 0, "gender_weight": 0, "age_weight": 0,
                     "backbone_lr_scale": 0, "grad_clip": 0, "log_interval": 1, **LOADER_MINIMUMS}
FRACTIONS = ("age_smoothing", "mix_prob", "momentum")  # 0 to 1
BELOW_ONE = ("ema_decay", "label_smoothing", "dropout")  # 0 to below 1: at 1 the average never moves, the target is flat, nothing passes


def check_at_least(cfg, minimums):
    for key, low in minimums.items():
        if cfg[key] < low:
            raise SystemExit(f"error: --{key} must be at least {low}, got {cfg[key]}")


def check_training_settings(cfg):
    """Numbers that cannot work are refused before a run folder is made, naming the flag."""
    check_at_least(cfg, TRAINING_MINIMUMS)
    if not cfg["lr"] > 0:
        raise SystemExit(f"error: --lr must be above 0, got {cfg['lr']}")
    for key in (*FRACTIONS, *BELOW_ONE):
        below = key in BELOW_ONE
        if not (0 <= cfg[key] < 1 if below else 0 <= cfg[key] <= 1):
            raise SystemExit(f"error: --{key} must be at least 0 and {'below' if below else 'at most'} 1, got {cfg[key]}")
    if not 30 < cfg["age_threshold"] <= 100:
        raise SystemExit(f"error: --age_threshold must be above 30 (where the middle band starts) and at most 100, "
                         f"got {cfg['age_threshold']}")
    if cfg["overwrite"] and not cfg["output_dir"]:
        raise SystemExit(f"error: --overwrite replaces the run in --output_dir, and none was given (a run named by "
                         f"--name never replaces one: it gets {cfg['name']}2, {cfg['name']}3...); give --output_dir "
                         f"{Path(cfg['model_dir']) / cfg['name']} to replace that run")
    if cfg["refit"] and cfg["val_ratio"] == 0:
        raise SystemExit("error: --refit trains once more on every person after the validated training; with "
                         "--val_ratio 0 the run trains on every person already: drop --refit")


def check_run_settings(cfg):
    """Every check of a new run's settings that needs no data (a bad --fold included), before a
    run folder is made; bench.py makes them before it builds maskbench."""
    check_training_settings(cfg)
    folds_to_train(cfg)
    check_criterion_settings(cfg)
    check_model_settings(cfg)


class Terminated(KeyboardInterrupt):
    """SIGTERM, which kill, timeout and job schedulers send, handled as Ctrl-C is."""


def interrupted_exit_code(interrupt):
    """The shell's code for a process stopped by the signal: 143 for SIGTERM, 130 for Ctrl-C."""
    return 128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within it, SIGTERM raises Terminated, so a stopped run is settled and its resume command
    logged as after Ctrl-C; the previous handler comes back after."""
    def terminate(signum, frame):
        raise Terminated
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(cfg, given=None):
    """Train a new run, or continue cfg['resume']; `given` as in resumed_config."""
    if cfg["resume"]:
        run_dir = Path(cfg["resume"])
        if not (run_dir / "config.json").is_file():
            raise SystemExit(f"error: {run_dir} is not a run folder (no config.json)")
        cfg = resumed_config(cfg, given, saved_config(run_dir))
        check_wandb(cfg)
        device = resolve_device(cfg["device"])  # the run's own, unless --device was given
    else:
        device = resolve_device(cfg["device"])
        check_run_settings(cfg)
        check_data_paths(cfg)
        check_pseudo_settings(cfg)
        check_wandb(cfg)
        run_dir = make_run_dir(cfg)
        write_text_atomic(json.dumps(cfg, indent=2), run_dir / "config.json")
    setup_logging(run_dir / "train.log")
    torch.backends.cudnn.benchmark = not cfg["deterministic"]
    torch.backends.cudnn.deterministic = cfg["deterministic"]
    log.info("run folder %s, device %s, command: %s", run_dir, device, shlex.join(sys.argv))
    if replaced_run(run_dir).exists():
        log.info("the run it replaces is kept in %s until this one has its first checkpoint", replaced_run(run_dir))
    try:
        with sigterm_as_interrupt():
            summaries = train(cfg, run_dir, device)
    except KeyboardInterrupt as e:
        if not settle_run(run_dir, discard_untrained=False):
            log.info("interrupted; continue with: python train.py --resume %s", run_dir)
        raise SystemExit(interrupted_exit_code(e))
    except (Exception, SystemExit) as e:
        # in train.log, if the run is kept (the console gets the error once, from SystemExit)
        if isinstance(e, DataError):  # bad input: the message names the file and the problem
            log.debug("stopped: %s", e)
        else:
            log.debug("training stopped", exc_info=True)
        settle_run(run_dir, discard_untrained=not cfg["resume"])  # a new run that trained nothing leaves nothing
        if isinstance(e, DataError):
            raise SystemExit(f"error: {e}")
        raise
    settle_run(run_dir, discard_untrained=False)
    if cfg["report"] and cfg["val_ratio"] > 0:
        write_run_report(run_dir, device)
    log.info("done: %s", run_dir)
    return run_dir, summaries


def write_run_report(run_dir, device):
    """The report/ pictures; a finished training never fails over them."""
    from report import write_report  # not at the top: report imports inference, which imports train
    try:
        with sigterm_as_interrupt():
            paths = write_report(run_dir, device)
        log.info("report: %d pictures in %s", len(paths), ", ".join(sorted({str(p.parent) for p in paths})))
    except KeyboardInterrupt as e:
        log.info("report interrupted; the run is finished; draw it with: python report.py --run %s", run_dir)
        raise SystemExit(interrupted_exit_code(e))
    except Exception as e:
        log.warning("report not written: %s: %s", type(e).__name__, e)


if __name__ == "__main__":
    main(*parse_config("train", description=__doc__, with_given=True))
