"""Combine the eval predictions of several runs into one submission.

    python ensemble.py --members runs/a runs/b runs/c                     # soft voting
    python ensemble.py --members runs/a runs/b --member_weights 2 1
    python ensemble.py --members runs/a runs/b runs/c --method hard       # ties: best validation F1
    python ensemble.py --members runs/a runs/b runs/c --method per_task --task_members 0 1 2
    make ensemble RUNS="runs/a runs/b" METHOD=soft

A member is a run folder (its eval_probs.csv, written by inference.py, and its validation or
out-of-fold probabilities) or an eval_probs.csv file. Members must cover the same ImageIDs.
Besides the submission, it writes <submission>.report.json: agreement between members and,
where validation probabilities of the same images exist, each member's and the ensemble's F1.
"""
import json
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from config import parse_config
from dataset import NUM_CLASSES, PROB_COLUMNS, DataError, check_probabilities, encode_class, image_key, read_csv, read_valid_probs
from train import score, setup_logging, write_text_atomic
from inference import write_submission
from model import TASKS, task_probabilities

log = logging.getLogger("mask")


def member_file(path):
    """The eval probabilities of a member: a run folder's eval_probs.csv, or the file given."""
    return Path(path) / "eval_probs.csv" if Path(path).is_dir() else Path(path)


class Member:
    """One ensemble member: eval probabilities (ImageID order kept), the eval images folder its
    inference.json names, and, when the run has them, validation probabilities keyed by image
    (dataset.image_key) with true labels."""

    def __init__(self, path):
        path = Path(path)
        self.name = str(path)
        if not path.exists():
            raise SystemExit(f"error: --members {path}: no such run folder or file")
        eval_file = member_file(path)
        if not eval_file.is_file():
            raise SystemExit(f"error: {eval_file} not found (run inference.py --run {path} first)")
        # the folder whose inference.json describes the file: a CSV of another name (a copy, another
        # checkpoint's predictions kept aside) is not what the folder's record and validation describe
        run_dir = path if path.is_dir() else path.parent if path.name == "eval_probs.csv" else None
        try:
            self.eval = read_csv(eval_file, ["ImageID", *PROB_COLUMNS], numeric=PROB_COLUMNS)
            check_member_table(self.eval, eval_file)
            inference = read_inference_record(run_dir) if run_dir else None
            self.valid = self.read_validation(path, run_dir, inference) if run_dir else None
        except DataError as e:  # the message names the file and the problem
            raise SystemExit(f"error: {e}")
        self.eval_images = inference.get("eval_images") if inference else None
        self.valid_f1 = score(self.valid["label"], self.valid["pred"])["f1"] if self.valid is not None else None

    @staticmethod
    def read_validation(path, run_dir, inference):
        """The member's validation probabilities keyed by image (runs may name one file two
        ways), or None when it has none that describe the models that predicted its eval images."""
        unvalidated = unvalidated_predictions(run_dir, inference)
        if unvalidated:
            log.info("%s: no validation F1: %s", path, unvalidated)
            return None
        for name in ("oof_probs.csv", "valid_probs.csv"):
            if (run_dir / name).is_file():
                valid = read_valid_probs(run_dir / name)
                return valid.set_index(valid["image_path"].map(image_key))
        return None

    @property
    def probs(self):
        return self.eval[PROB_COLUMNS].to_numpy()


def read_inference_record(run_dir):
    """The inference.json inference.py wrote beside a run's eval predictions, or None."""
    record = run_dir / "inference.json"
    if not record.is_file():
        return None
    try:
        inference = json.loads(record.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        inference, problem = None, f"{type(e).__name__}: {e}"
    else:
        problem = "no list of models, each with its checkpoint"
    models = inference.get("models") if isinstance(inference, dict) else None
    if not (isinstance(models, list) and all(isinstance(model, dict) and "checkpoint" in model for model in models)):
        raise DataError(f"{record}: not an inference.json that inference.py wrote ({problem}); "
                        f"predict again with inference.py --run {run_dir}")
    return inference


def unvalidated_predictions(run_dir, inference):
    """Why a run's validation probabilities do not describe the models that predicted its eval
    images (its inference.json names them, and decides alone), or None when they do."""
    if inference is None:  # no record: a run with a later stage predicts with it
        if (run_dir / "pseudo").is_dir():
            return "its pseudo-label stage predicted eval, and has no validation"
        if (run_dir / "refit").is_dir():
            return "its refit model predicted eval, and was trained on the validation people"
        return None
    others = [model["checkpoint"] for model in inference["models"] if not is_validated_checkpoint(model, run_dir)]
    if others:
        return f"eval was predicted with {', '.join(others[:3])}{' ...' if len(others) > 3 else ''}, not only its own best.pt"
    return None


def is_validated_checkpoint(model, run_dir):
    """Whether an inference.json model is one whose validation the run folder holds: its best.pt
    or a fold's. inference.py records where each lies in the folder it wrote to, which holds
    however the run is moved or renamed; older records give only the path, compared as a path
    and then by folder name."""
    if "in_output_dir" in model:
        return re.fullmatch(r"(fold\d+/)?best\.pt", model["in_output_dir"] or "") is not None
    checkpoint = Path(model["checkpoint"])
    if checkpoint.name != "best.pt":
        return False
    run = Path(run_dir).resolve()
    home = checkpoint.parent
    if re.fullmatch(r"fold\d+", home.name):
        home = home.parent
    return home.resolve() == run or home.name == run.name


def check_member_table(table, path):
    """Each ImageID once, and each row's p0..p17 class probabilities."""
    ids = table["ImageID"]
    repeated = ids[ids.duplicated()].unique()
    if len(repeated):
        raise DataError(f"{path}: {len(repeated)} ImageID(s) appear more than once: {list(repeated[:5])}")
    check_probabilities(table[PROB_COLUMNS].to_numpy(), path, ids, "ImageID")


def check_same_ids(members):
    """Refuse members whose ImageIDs differ, naming the ids."""
    reference = members[0]
    for m in members[1:]:
        if m.eval["ImageID"].tolist() != reference.eval["ImageID"].tolist():
            a, b = set(reference.eval["ImageID"]), set(m.eval["ImageID"])
            only_a, only_b = sorted(a - b)[:5], sorted(b - a)[:5]
            detail = f"only in {reference.name}: {only_a}; only in {m.name}: {only_b}" if a != b else "same ids in another order"
            raise SystemExit(f"error: members {reference.name} and {m.name} have different ImageIDs ({detail})")


def warn_other_eval_folders(members):
    """Members with the same ImageIDs predicted from different eval folders (their inference.json
    says which) are combined, as a copy of eval/ on another machine should be; a re-encoded or
    other copy would not be, so the folders are named."""
    folders = {}
    for m in members:
        if m.eval_images:
            folders.setdefault(str(Path(m.eval_images).resolve()), []).append(m.name)
    if len(folders) > 1:
        log.warning("the members predicted eval images from %d folders: %s; combined by ImageID, which assumes "
                    "they hold the same images", len(folders),
                    "; ".join(f"{folder} ({', '.join(names)})" for folder, names in folders.items()))


def in_info_order(members, preds):
    """The ImageIDs and answers in the order of info.csv of the eval folder the members predicted
    (their inference.json names it), as the submission must be. Members read from CSV files
    keep their own order; ImageIDs other than info.csv's (the folder changed since) are refused."""
    ids = members[0].eval["ImageID"]
    named = [Path(m.eval_images).parent / "info.csv" for m in members if m.eval_images]
    info_csv = next((path for path in named if path.is_file()), None)
    if info_csv is None:
        if named:
            log.info("%s not found (moved?): the submission keeps the members' order", named[0])
        return ids.tolist(), preds
    try:
        info_ids = read_csv(info_csv, ["ImageID"])["ImageID"].tolist()
    except DataError as e:
        raise SystemExit(f"error: {e}")
    if ids.tolist() == info_ids:
        return info_ids, preds
    if sorted(ids) != sorted(info_ids):
        only_members, only_info = sorted(set(ids) - set(info_ids))[:5], sorted(set(info_ids) - set(ids))[:5]
        raise SystemExit(f"error: the members' ImageIDs are not those of {info_csv}, whose images they predicted "
                         f"(only in the members: {only_members}; only in info.csv: {only_info}); predict again with "
                         "inference.py")
    log.info("answers put in the order of %s", info_csv)
    return info_ids, preds[pd.Series(np.arange(len(ids)), index=ids)[info_ids].to_numpy()]


def soft_vote(probs, weights=None):
    """Weighted mean of the members' probabilities (list of N x 18 arrays)."""
    weights = np.ones(len(probs)) if not weights else np.asarray(weights, float)
    return sum(w * p for w, p in zip(weights, probs)) / weights.sum()


def hard_vote(preds, member_f1=None):
    """Majority class per image; a tie goes to the tied class of the member with the best
    validation F1 (member order when F1s are unknown)."""
    preds = np.asarray(preds)  # members x images
    order = np.argsort(-np.nan_to_num(np.asarray(member_f1, float), nan=-1), kind="stable") if member_f1 else np.arange(len(preds))
    result = np.empty(preds.shape[1], int)
    for i in range(preds.shape[1]):
        counts = np.bincount(preds[:, i], minlength=NUM_CLASSES)
        tied = set(np.flatnonzero(counts == counts.max()))
        result[i] = next(preds[m, i] for m in order if preds[m, i] in tied)
    return result


def per_task(probs, task_members):
    """Mask from member a, gender from member b, age from member c (indices into probs)."""
    answers = [task_probabilities(probs[member])[task].argmax(1) for member, task in zip(task_members, TASKS)]
    return encode_class(*answers)


def check_vote_settings(cfg, n_members):
    """The method and its flags, checked once before any member is read."""
    method, weights, task_members = cfg["method"], cfg["member_weights"], cfg["task_members"]
    if method not in ("soft", "hard", "per_task"):
        raise SystemExit(f"error: method '{method}' is not soft, hard or per_task")
    if weights and method != "soft":
        raise SystemExit(f"error: --member_weights weigh soft voting only; --method {method} would ignore them")
    if task_members and method != "per_task":
        raise SystemExit(f"error: --task_members pick members per task for --method per_task only; --method {method} "
                         "would ignore them")
    if weights and (len(weights) != n_members or not np.isfinite(weights).all() or min(weights) < 0 or sum(weights) <= 0):
        raise SystemExit(f"error: --member_weights {weights} for {n_members} members: give one weight per member, "
                         "in member order, finite numbers, none negative and not all 0")
    if method == "per_task" and (len(task_members) != 3 or not all(0 <= m < n_members for m in task_members)):
        raise SystemExit("error: per_task needs --task_members A B C (member indices for mask, gender, age)")


def combine(probs, cfg, member_f1=None):
    """The ensemble's class per image (settings checked by check_vote_settings)."""
    if cfg["method"] == "soft":
        return soft_vote(probs, cfg["member_weights"]).argmax(1)
    if cfg["method"] == "hard":
        return hard_vote([p.argmax(1) for p in probs], member_f1)
    return per_task(probs, cfg["task_members"])


def validation_report(members, cfg):
    """Each member's and the ensemble's F1 on the validation images all members share."""
    if any(m.valid is None for m in members):
        log.info("no ensemble validation: %s ha(s) no validation probabilities",
                 ", ".join(m.name for m in members if m.valid is None))
        return {}
    shared = sorted(set.intersection(*(set(m.valid.index) for m in members)))
    if not shared:
        log.info("no ensemble validation: the members' validation images do not overlap (other data or folds)")
        return {}
    labels = members[0].valid.loc[shared, "label"].to_numpy()
    probs = [m.valid.loc[shared, PROB_COLUMNS].to_numpy() for m in members]
    f1s = [score(labels, p.argmax(1))["f1"] for p in probs]
    return {"images": len(shared), "member_f1": f1s, "ensemble": score(labels, combine(probs, cfg, f1s))}


def main(cfg):
    setup_logging()
    if not cfg["members"]:
        raise SystemExit("error: give the members with --members RUN_OR_CSV ...")
    out = Path(cfg["submission"])
    if out.is_dir():
        raise SystemExit(f"error: --submission {out} is a folder; give a file, e.g. {out / 'submission.csv'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: --submission {out}: cannot make its folder {out.parent} ({e.strerror})")
    files = [member_file(p).resolve() for p in cfg["members"]]
    repeated = sorted({str(f) for f in files if files.count(f) > 1})
    if repeated:
        raise SystemExit(f"error: member(s) given more than once: {repeated}; to count one more, use --member_weights")
    if out.resolve() in files:
        raise SystemExit(f"error: --submission {out} is a member's probabilities; writing there would replace them")
    check_vote_settings(cfg, len(cfg["members"]))
    members = [Member(p) for p in cfg["members"]]
    check_same_ids(members)
    warn_other_eval_folders(members)
    probs = [m.probs for m in members]
    preds = combine(probs, cfg, [m.valid_f1 for m in members])
    member_preds = [p.argmax(1) for p in probs]
    report = {
        "method": cfg["method"], "members": [m.name for m in members],
        "member_valid_f1": [m.valid_f1 for m in members],
        "agreement": [[float((a == b).mean()) for b in member_preds] for a in member_preds],
        "agreement_with_ensemble": [float((p == preds).mean()) for p in member_preds],
        "validation": validation_report(members, cfg),
    }
    replaced = out.exists()
    ids, preds = in_info_order(members, preds)
    write_submission(ids, preds, out.parent, out.name)
    write_text_atomic(json.dumps(report, indent=2), Path(f"{out}.report.json"))
    for name, f1, agree in zip(report["members"], report["member_valid_f1"], report["agreement_with_ensemble"]):
        log.info("member %s: validation F1 %s, agrees with the ensemble on %.1f%%", name,
                 "n/a" if f1 is None else f"{f1:.4f}", 100 * agree)
    if report["validation"]:
        log.info("ensemble validation macro F1 %.4f on %d shared images", report["validation"]["ensemble"]["f1"],
                 report["validation"]["images"])
    log.info("wrote %s and %s.report.json%s", out, out, " (replacing the earlier ones)" if replaced else "")
    return out, report


if __name__ == "__main__":
    main(parse_config("ensemble", description=__doc__))
