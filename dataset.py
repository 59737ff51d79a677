"""The competition data: reading and checking it, labels, corrections, splits by person,
face boxes (faces.csv) and face crops, a decoded-image cache, augmentation presets and batch
mixing.

Layout read (exactly as the competition ships it):
    train/train.csv                     id,gender,race,age,path
    train/images/{path}/mask1..mask5, incorrect_mask, normal  (.jpg .jpeg .png, any case)
    eval/info.csv                       ImageID,ans
    eval/images/{ImageID}

Everything here is a function of its arguments: no class attributes hold data, so a second
dataset object never shares or duplicates the first one's state.
"""
import csv
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps
from sklearn.model_selection import StratifiedGroupKFold
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

log = logging.getLogger("mask")

# ---------------------------------------------------------------------------------------------
# Labels
MASK_FILES = {"mask1": 0, "mask2": 0, "mask3": 0, "mask4": 0, "mask5": 0, "incorrect_mask": 1, "normal": 2}
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png"}
GENDERS = {"male": 0, "female": 1}
MASK_NAMES = ("wear", "incorrect", "not_wear")
GENDER_NAMES = ("male", "female")
AGE_NAMES = ("<30", "30-59", ">=60")
NUM_CLASSES = 18
PROB_COLUMNS = [f"p{c}" for c in range(NUM_CLASSES)]  # class probabilities in CSVs (eval_probs, soft labels)
# A pseudo-labelled or CSV-listed image knows only its age band: its table row gets this age so
# that its band comes out right (for any age_threshold from 31 to 100, the range train.py takes),
# with age_known False; the loss then leaves it out of the age regression and keeps its age-band
# target one-hot.
BAND_AGES = (25, 30, 100)
AGES = range(1, 121)  # a labelled age outside it is a typo (290 for 29), not a person of 290


def whole_age(text):
    """An age written in ASCII digits within AGES as an int, else None."""
    text = str(text)
    return int(text) if text.isascii() and text.isdigit() and int(text) in AGES else None


def age_band(age, age_threshold=60):
    """0: age < 30, 1: 30 <= age < age_threshold, 2: age >= age_threshold (works on arrays)."""
    age = np.asarray(age)
    return np.where(age < 30, 0, np.where(age < age_threshold, 1, 2))


def encode_class(mask, gender, band):
    return np.asarray(mask) * 6 + np.asarray(gender) * 3 + np.asarray(band)


def decode_class(label):
    """18-class code -> (mask, gender, age band); works on ints, arrays and tensors."""
    return label // 6, (label // 3) % 2, label % 3


def class_name(label):
    mask, gender, band = decode_class(int(label))
    return f"{MASK_NAMES[mask]}/{GENDER_NAMES[gender]}/{AGE_NAMES[band]}"


def is_class(values):
    """Which values are classes 0..17 (whole numbers in range), as a boolean Series."""
    return pd.Series(values).isin(range(NUM_CLASSES))


def image_key(path):
    """The string every table compares images by: the absolute path, links resolved, so the
    same file reached two ways (a relative path, a pseudo-label CSV) is recognised."""
    return str(Path(path).resolve())


class DataError(ValueError):
    """Bad input data; the message names the file and what is wrong. A DataLoader worker
    re-raises it with the worker's traceback as the message; only the message is kept."""

    def __init__(self, message):
        if message.startswith("Caught DataError in DataLoader worker"):  # the error line ends the traceback
            message = message.rsplit("Traceback (most recent call last):", 1)[-1].split("DataError: ", 1)[-1].strip()
        super().__init__(message)


# ---------------------------------------------------------------------------------------------
# Reading and checking
def read_csv(path, columns, numeric=()):
    """A CSV as stripped text with the given columns, the `numeric` ones converted to numbers;
    anything wrong is a DataError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False).apply(lambda col: col.str.strip())
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot parse CSV ({e})")
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {list(table.columns)}")
    lines = check_field_counts(path)
    # the file line of each row, for messages about it (numbered_rows); counted as pandas does
    table.attrs["lines"] = lines if len(lines) == len(table) else list(range(2, len(table) + 2))
    for column in numeric:
        values = pd.to_numeric(table[column], errors="coerce")
        if values.isna().any():
            raise DataError(f"{path}: column {column}: {table[column][values.isna()].tolist()[:3]} not numbers")
        table[column] = values
    return table


def read_valid_probs(path):
    """A validation probability table train.py wrote (valid_probs.csv, oof_probs.csv: image_path,
    p0..p17, pred, label), or a DataError naming the file: a damaged one would otherwise be
    scored, ensembled or drawn wrong, or stop with a pandas traceback."""
    numbers = [*PROB_COLUMNS, "pred", "label"]
    table = read_csv(path, ["image_path", *numbers], numeric=numbers)
    if table.empty:
        raise DataError(f"{path}: no rows")
    check_probabilities(table[PROB_COLUMNS].to_numpy(), path, table["image_path"], "image_path")
    bad = ~(is_class(table["pred"]).to_numpy() & is_class(table["label"]).to_numpy())
    if bad.any():
        lines = np.asarray(table.attrs["lines"])[bad].tolist()
        raise DataError(f"{path}: line(s) {lines[:5]}: pred and label must be classes 0 to {NUM_CLASSES - 1}")
    return table


def check_probabilities(probs, path, names, name_column):
    """Each row of p0..p17 (N x 18) must be class probabilities: numbers in [0, 1] summing to 1
    within 0.01 (inference.py writes float32; a file rounded to 3 decimals stays within it).
    names: what each row is called in the message (its name_column, e.g. ImageID)."""
    names = np.asarray(names)
    outside = ~((probs >= 0) & (probs <= 1)).all(1)  # NaN too
    if outside.any():
        raise DataError(f"{path}: {outside.sum()} row(s) with p0..p17 not numbers in [0, 1], e.g. {name_column} "
                        f"{names[outside].tolist()[:3]}")
    sums = probs.sum(1)
    off = np.abs(sums - 1) > 0.01
    if off.any():
        raise DataError(f"{path}: {off.sum()} row(s) whose p0..p17 do not sum to 1, e.g. {name_column} "
                        f"{names[off].tolist()[:3]} (sums {np.round(sums[off][:3], 4).tolist()})")


def check_field_counts(path):
    """pandas reads a row with one field too many as a shifted row, which then fails far from its
    cause (or not at all); every row must have the header's number of fields. Returns the file
    line of each row pandas reads: it skips empty and whitespace-only lines."""
    lines = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = csv.reader(f)
        try:
            width = len(next(rows, []))
            for row in rows:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                lines.append(rows.line_num)
                if any(field.strip() for field in row) and len(row) != width:
                    raise DataError(f"{path}: line {rows.line_num}: {len(row)} fields, but the header has {width}")
        except csv.Error as e:
            raise DataError(f"{path}: line {rows.line_num}: cannot parse CSV ({e})")
    return lines


def numbered_rows(table):
    """(file line, row) of each row of a table read_csv read."""
    return zip(table.attrs["lines"], table.itertuples())


def train_root(data_dir):
    """Accept the train folder or its images/ folder (the starter code pointed at images/). A
    root written "." or ending in ".." is made absolute: its eval/ sibling is found through
    .parent, and the parent of "." is "." again."""
    data_dir = Path(data_dir)
    root = data_dir.parent if data_dir.name == "images" and not (data_dir / "train.csv").exists() else data_dir
    return root.resolve() if root.name in ("", "..") else root


def eval_folder(cfg):
    """A training config's eval folder: its eval_dir, else the eval/ folder the competition ships
    beside train/."""
    return cfg["eval_dir"] or str(train_root(cfg["data_dir"]).parent / "eval")


def read_people(data_dir):
    """train.csv as a table of people: id (string), gender (0/1), age (int), path (folder)."""
    csv_path = train_root(data_dir) / "train.csv"
    people = read_csv(csv_path, ["id", "gender", "race", "age", "path"])
    if people.empty:
        raise DataError(f"{csv_path}: no people (a header and no rows)")
    for line, rec in numbered_rows(people):
        if whole_age(rec.age) is None:
            raise DataError(f"{csv_path}: line {line}: age '{rec.age}' is not whole years from {AGES[0]} to {AGES[-1]} "
                            "in digits (e.g. 29)")
        if rec.gender.lower() not in GENDERS:
            raise DataError(f"{csv_path}: line {line}: gender '{rec.gender}' is not male or female")
        if not rec.id.strip() or not rec.path.strip():
            raise DataError(f"{csv_path}: line {line}: empty id or path")
    # two rows reading one folder (however written: 'a/' and 'a') would put its images on both sides of a split
    folders = people["path"].map(lambda path: (csv_path.parent / "images" / path).resolve())
    for column, values in (("id", people["id"]), ("path", folders)):
        duplicated = people[column][values.duplicated(keep=False)].tolist()
        if duplicated:
            raise DataError(f"{csv_path}: duplicate {column}(s) {duplicated[:10]}")
    warn_folder_names(people, csv_path)
    return pd.DataFrame({
        "id": people["id"],
        "gender": people["gender"].str.lower().map(GENDERS).astype(int),
        "age": people["age"].astype(int),
        "path": people["path"],
    })


def warn_folder_names(people, csv_path):
    """The starter code read labels from the folder names ({id}_{gender}_{race}_{age}); this kit
    reads train.csv's columns. A folder name that disagrees with its row (a fix applied to one and
    not the other) or is not in that form is logged, naming the rows; the columns are used."""
    disagree = []
    for line, rec in numbered_rows(people):
        parts = rec.path.split("_")
        if len(parts) < 4 or (parts[0], parts[1].lower(), parts[-1]) != (rec.id, rec.gender.lower(), rec.age):
            disagree.append(f"line {line}: {rec.id},{rec.gender},{rec.age} vs folder {rec.path}")
    if disagree:
        log.warning("%s: %d row(s) whose folder name is not {id}_{gender}_{race}_{age} with their id, gender and age "
                    "(the columns are used): %s",
                    csv_path, len(disagree), "; ".join(disagree[:5]))


def warn_unlisted(folder, listed, csv_path, what):
    """Entries of folder that csv_path does not list are not read; say so, naming them, rather
    than leave a person or an eval image out silently. Hidden files are ignored."""
    unlisted = sorted(p.name for p in Path(folder).iterdir() if not p.name.startswith(".") and p.name not in listed)
    if unlisted:
        log.warning("%s: %d %s(s) not listed in %s are not read: %s", folder, len(unlisted), what, csv_path,
                    ", ".join(unlisted[:5]) + (" ..." if len(unlisted) > 5 else ""))


def person_images(folder):
    """The 7 image files of a person folder as {stem: path}; anything missing or extra is an error.
    Hidden files (names starting with '.', such as the macOS '._mask1.jpg' copies in the
    competition archive) are not images and are ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: person folder not found")
    found = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        stem, ext = path.stem, path.suffix.lower()
        if stem not in MASK_FILES or ext not in IMAGE_EXTENSIONS:
            raise DataError(f"{path}: unexpected file (expected {sorted(MASK_FILES)} as .jpg/.jpeg/.png)")
        if not path.is_file():
            raise DataError(f"{path}: not a file (a folder, or a link to nothing)")
        if stem in found:
            raise DataError(f"{folder}: two files for {stem}: {found[stem].name} and {path.name}")
        found[stem] = path
    missing = sorted(set(MASK_FILES) - set(found))
    if missing:
        raise DataError(f"{folder}: missing image(s) {missing}")
    return found


def check_training_folder(data_dir):
    """The training folder (train_root) if it is one; train.py calls it before making a run
    folder, so a wrong path leaves nothing behind."""
    root = train_root(data_dir)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; give the training folder (train.csv and images/) with --data_dir "
                        "(python make_sample_data.py writes a small sample, whose training folder is data/sample/train)")
    if not (root / "train.csv").is_file() and (root / "train" / "train.csv").is_file():
        raise DataError(f"{root}: no train.csv here; the training folder is {root / 'train'}: --data_dir {root / 'train'}")
    return root


def read_train_images(data_dir, corrections="", source="train"):
    """One row per image: id, file, image_path, mask, gender, age, source."""
    root = check_training_folder(data_dir)
    people = read_people(root)
    files = {rec.id: person_images(root / "images" / rec.path) for rec in people.itertuples()}
    warn_unlisted(root / "images", set(people["path"]), root / "train.csv", "person folder")
    if corrections:
        people, files = apply_corrections(people, files, corrections)
    rows = [
        {"id": rec.id, "file": stem, "image_path": str(path), "mask": MASK_FILES[stem],
         "gender": rec.gender, "age": rec.age, "source": source}
        for rec in people.itertuples() for stem, path in files[rec.id].items()
    ]
    return pd.DataFrame(rows)


def read_eval_images(eval_dir):
    """info.csv in its order, with the path of every image (missing images are an error)."""
    eval_dir = Path(eval_dir)
    if not eval_dir.is_dir():
        raise DataError(f"{eval_dir}: no such folder; the eval folder holds info.csv and images/ (--eval_dir)")
    info = read_csv(eval_dir / "info.csv", ["ImageID", "ans"])
    if info.empty:
        raise DataError(f"{eval_dir / 'info.csv'}: no images listed (a header and no rows)")
    paths = [eval_dir / "images" / image_id for image_id in info["ImageID"]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{eval_dir / 'info.csv'}: {len(missing)} listed image(s) not found, e.g. {missing[:3]}")
    duplicated = info["ImageID"][info["ImageID"].duplicated()].tolist()
    if duplicated:
        raise DataError(f"{eval_dir / 'info.csv'}: duplicate ImageID(s) {duplicated[:5]}")
    warn_unlisted(eval_dir / "images", set(info["ImageID"]), eval_dir / "info.csv", "image")
    return pd.DataFrame({"ImageID": info["ImageID"], "image_path": [str(p) for p in paths]})


def read_soft_targets(table, csv_path):
    """The p0..p17 columns of a label CSV as an N x 18 array of class probabilities, or None
    when it has none of them."""
    present = [c for c in PROB_COLUMNS if c in table]
    if not present:
        return None
    if len(present) < NUM_CLASSES:
        raise DataError(f"{csv_path}: soft targets need all of p0..p17; missing {sorted(set(PROB_COLUMNS) - set(present))}")
    probs = table[PROB_COLUMNS].apply(pd.to_numeric, errors="coerce").to_numpy(np.float32)
    check_probabilities(probs, csv_path, table["path"], "path")
    return probs


def read_label_csv(csv_path, source):
    """A CSV of extra training images: path (relative to the CSV), class (0..17), optional age,
    optional p0..p17. A row with a blank age (or a CSV without the column) knows only its age band.
    With p0..p17 (pseudo labels written with --pseudo_soft), those class probabilities are the
    loss's targets (summed over each head's classes); class remains the row's label for what needs
    one class (balanced sampler, class weights, the f1 criterion)."""
    csv_path = Path(csv_path)
    table = read_csv(csv_path, ["path", "class"])
    labels = pd.to_numeric(table["class"], errors="coerce")
    bad = table["class"][~is_class(labels)].tolist()
    if bad:
        raise DataError(f"{csv_path}: class value(s) {bad[:5]} are not integers 0..17")
    soft = read_soft_targets(table, csv_path)
    labels = labels.astype(int).to_numpy()
    mask, gender, band = decode_class(labels)
    given = table["age"] if "age" in table else pd.Series("", index=table.index)
    read_ages = [whole_age(a) if a else None for a in given]
    bad_ages = [a for a, age in zip(given, read_ages) if a and age is None]
    if bad_ages:
        raise DataError(f"{csv_path}: age value(s) {bad_ages[:5]} are not whole years from {AGES[0]} to {AGES[-1]}")
    has_age = (given != "").to_numpy()
    ages = np.array([age if known else BAND_AGES[b] for age, known, b in zip(read_ages, has_age, band)], dtype=int)
    wrong_band = table["path"][has_age & (age_band(ages) != band)].tolist()
    if wrong_band:
        raise DataError(f"{csv_path}: the age of {wrong_band[:3]} is not in the age band of its class")
    paths = [image_key(csv_path.parent / p) for p in table["path"]]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise DataError(f"{csv_path}: {len(missing)} listed image(s) not found, e.g. {missing[:3]}")
    rows = pd.DataFrame({"id": [f"{source}:{Path(p).stem}" for p in paths], "file": [Path(p).stem for p in paths],
                         "image_path": paths, "mask": mask, "gender": gender, "age": ages, "age_known": has_age,
                         "source": source, "label_csv": str(csv_path)})
    return rows if soft is None else pd.concat([rows, pd.DataFrame(soft, columns=PROB_COLUMNS)], axis=1)


def count_people(table):
    """(people, images from label CSVs) of an image table: a label CSV names images, not people
    (each row has its own id), so its images are counted apart."""
    from_csv = table["label_csv"].notna().to_numpy() if "label_csv" in table else np.zeros(len(table), bool)
    return table["id"][~from_csv].nunique(), int(from_csv.sum())


def read_extra(paths):
    """Extra training-only data: competition-layout folders or label CSVs, ids prefixed by source."""
    tables = []
    for k, path in enumerate(paths):
        source = f"extra{k}"
        if Path(path).is_dir():
            table = read_train_images(path, source=source)
            table["id"] = source + ":" + table["id"]
        else:
            table = read_label_csv(path, source)
        log.info("extra data %s: %d images", path, len(table))
        tables.append(table)
    return tables


def add_labels(images, age_threshold):
    """Add the training labels (age_band, label) under age_threshold, and true_label: the
    competition's class (oldest band from 60), which validation always scores against, so runs
    with different thresholds are compared on the real task."""
    images = images.copy()
    images["age_band"] = age_band(images["age"], age_threshold)
    images["label"] = encode_class(images["mask"], images["gender"], images["age_band"])
    images["true_label"] = encode_class(images["mask"], images["gender"], age_band(images["age"]))
    return images


# ---------------------------------------------------------------------------------------------
# Corrections
def apply_corrections(people, files, corrections_csv):
    """Apply a corrections CSV (id,field,value), one log line per correction.
    field gender: male / female / flip; field age: a whole number;
    field swap: two file stems separated by a space, e.g. 'incorrect_mask normal'."""
    table = read_csv(corrections_csv, ["id", "field", "value"])
    if len(table) and not table["id"].isin(people["id"]).any():
        unpadded = set(people["id"].str.lstrip("0"))
        hint = ("; ids are compared as text and its ids match the data's only without their leading zeros (saved "
                "by a spreadsheet?)" if table["id"].str.lstrip("0").isin(unpadded).any() else "; corrections for other data?")
        raise DataError(f"{corrections_csv}: none of its {len(table)} ids is in the data{hint}")
    people = people.set_index("id", drop=False)
    files = {k: dict(v) for k, v in files.items()}
    earlier = {}  # (id, field[, swapped pair]) -> (line, value)
    for line, rec in numbered_rows(table):
        where = f"{corrections_csv}: line {line}"
        key = (rec.id, rec.field, frozenset(rec.value.split()) if rec.field == "swap" else None)
        if key in earlier:
            first_line, value = earlier[key]
            if rec.field in ("gender", "age") and rec.value.lower() == value.lower() != "flip":
                log.info("%s: the same correction as line %d, applied once", where, first_line)  # e.g. two lists merged
                continue
            # a second flip or swap would undo the first, another gender or age contradict it
            raise DataError(f"{where}: a second {rec.field} correction of id {rec.id} (line {first_line}); keep one")
        earlier[key] = (line, rec.value)
        if rec.id not in people.index:
            log.warning("%s: id %s is not in the data; correction not applied", where, rec.id)
            continue
        if rec.field == "gender":
            old = int(people.at[rec.id, "gender"])
            new = 1 - old if rec.value.lower() == "flip" else GENDERS.get(rec.value.lower())
            if new is None:
                raise DataError(f"{where}: gender value '{rec.value}' is not male, female or flip")
            people.at[rec.id, "gender"] = new
            log.info("correction %s: gender %s -> %s", rec.id, GENDER_NAMES[old], GENDER_NAMES[new])
        elif rec.field == "age":
            if whole_age(rec.value) is None:
                raise DataError(f"{where}: age value '{rec.value}' is not whole years from {AGES[0]} to {AGES[-1]}")
            log.info("correction %s: age %s -> %s", rec.id, people.at[rec.id, "age"], rec.value)
            people.at[rec.id, "age"] = whole_age(rec.value)
        elif rec.field == "swap":
            stems = rec.value.split()
            if len(stems) != 2 or not set(stems) <= set(MASK_FILES):
                raise DataError(f"{where}: swap value '{rec.value}' must be two of {sorted(MASK_FILES)}")
            a, b = stems
            files[rec.id][a], files[rec.id][b] = files[rec.id][b], files[rec.id][a]
            log.info("correction %s: swapped %s and %s", rec.id, a, b)
        else:
            raise DataError(f"{where}: field '{rec.field}' is not gender, age or swap")
    return people.reset_index(drop=True), files


# ---------------------------------------------------------------------------------------------
# Splits by person
def num_folds(val_ratio):
    """The folds of a split holding out val_ratio of the people (train.py refuses other ratios
    with a message naming the flag)."""
    if not 0 < val_ratio <= 0.5:
        raise ValueError(f"val_ratio must be above 0 and at most 0.5 for a split, got {val_ratio}")
    return round(1 / val_ratio)


def assign_folds(images, n_folds, seed):
    """Fold of every person: stratified group k-fold over images, stratified on gender x age
    band (the competition's bands, so the folds do not move with age_threshold), grouped by
    person, so all of a person's images fall in one fold."""
    people = images["id"].nunique()
    too_few = (f"{people} training people do not fill {n_folds} validation folds (each needs one at least; with "
               f"about as many people as folds the strata can leave one empty): give --val_ratio 0.5 (2 folds) or "
               f"more people, or --val_ratio 0 to train on all")
    if people < n_folds:
        raise DataError(too_few)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    strata = images["gender"] * 3 + age_band(images["age"])
    fold_of = {}
    for fold, (_, valid_idx) in enumerate(splitter.split(images, strata, groups=images["id"])):
        fold_of.update({pid: fold for pid in images["id"].iloc[valid_idx]})
    if len(set(fold_of.values())) < n_folds:
        raise DataError(too_few)
    return images["id"].map(fold_of).astype(int)


def load_training_images(cfg):
    """All training images, after corrections, with labels (dataset.add_labels) and a fold
    column (-1 for extra data, training only, and for every image with val_ratio 0). drop_ages
    apply later, in split_train_valid."""
    images = add_labels(read_train_images(cfg["data_dir"], cfg["corrections"]), cfg["age_threshold"])
    images["fold"] = assign_folds(images, num_folds(cfg["val_ratio"]), cfg["seed"]) if cfg["val_ratio"] > 0 else -1
    extra = [add_labels(t, cfg["age_threshold"]).assign(fold=-1) for t in read_extra(cfg["extra_data"])]
    check_extra_images_are_new(images, extra, cfg["extra_data"])
    return pd.concat([images, *extra], ignore_index=True)


def check_extra_images_are_new(images, extra, extra_paths):
    """Extra data is for training only: an image already read from --data_dir (the training
    folder given again, or a copy of it, found by its bytes where file sizes match) would be
    validated on too, so it is refused, as is one file given twice. Copies among the extra
    images themselves are left alone: external photo sets hold a few."""
    if not extra:
        return
    seen = set(map(image_key, images["image_path"]))
    training_by_size, digests = {}, {}
    for path in images["image_path"]:
        training_by_size.setdefault(os.stat(path).st_size, []).append(path)

    def digest(path):
        if path not in digests:
            digests[path] = hashlib.sha1(Path(path).read_bytes()).digest()
        return digests[path]

    for source, table in zip(extra_paths, extra):
        repeated = []
        for path in table["image_path"]:
            resolved = image_key(path)
            if resolved in seen:  # the same file
                repeated.append(resolved)
            else:  # a copy: the same bytes (read only where a training image has the same size)
                copy_of = next((training for training in training_by_size.get(os.stat(path).st_size, ())
                                if digest(training) == digest(path)), None)
                if copy_of is not None:
                    repeated.append(f"{resolved} (a copy of {copy_of})")
            seen.add(resolved)
        if repeated:
            raise DataError(f"{source}: {len(repeated)} image(s) already read from --data_dir or an earlier "
                            f"--extra_data, e.g. {repeated[:3]}; extra data is for training only, and these would "
                            "be validated on or counted twice")


def age_known(images):
    """Which rows know their age (bool array): all but those of label CSVs without ages, whose
    age column holds only their band's stand-in (BAND_AGES)."""
    if "age_known" not in images:
        return np.ones(len(images), bool)
    return images["age_known"].fillna(True).astype(bool).to_numpy()


def split_train_valid(images, fold, drop_ages=()):
    """Training and validation rows for one fold (fold None: everybody trains, validation is
    None); drop_ages leave training only (images whose age is unknown stay). Validation rows
    are labelled with the true classes (label = true_label), whatever age_threshold the
    training labels use."""
    in_valid = images["fold"] == fold if fold is not None else np.zeros(len(images), bool)
    dropped = images["age"].isin(list(drop_ages)) & age_known(images)
    train = images[~in_valid & ~dropped].reset_index(drop=True)
    if train.empty:
        raise DataError(f"no training images left for fold {fold} (drop_ages {list(drop_ages)} removes "
                        f"{int(dropped.sum())} of {len(images)} images)")
    if fold is None:
        return train, None
    valid = images[in_valid].reset_index(drop=True).assign(label=lambda t: t["true_label"])
    assert not set(train["id"]) & set(valid["id"]), "a person is on both sides of the split"
    return train, valid


# ---------------------------------------------------------------------------------------------
# Crop boxes: the centre, or the face found by detect_faces.py
FULL_IMAGE = (0.0, 0.0, 1.0, 1.0)
FACES_CSV = "faces.csv"
LANDMARKS = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")  # as seen in the photo
LANDMARK_COLUMNS = [f"{name}_{axis}" for name in LANDMARKS for axis in "xy"]
FACE_COLUMNS = ["image", "width", "height", "found", "score", "x1", "y1", "x2", "y2", *LANDMARK_COLUMNS]
FILE_BYTES = "bytes"  # the image file's size when its face was found; optional (older faces.csv lack it)


def center_box(center_crop):
    """The central fraction (h, w) of an image as a box of fractions."""
    ch, cw = center_crop
    return ((1 - cw) / 2, (1 - ch) / 2, (1 + cw) / 2, (1 + ch) / 2)


def dataset_folder(path):
    """The folder a dataset's faces.csv lives in: the parent of the image's images/ folder
    (train/ or eval/), or the image's own folder when it has no images/ ancestor."""
    path = Path(path)
    for parent in path.parents:
        if parent.name == "images":
            return parent.parent
    return path.parent


def read_faces(folder):
    """folder/faces.csv (written by detect_faces.py) as {absolute image path: row}."""
    csv_path = Path(folder) / FACES_CSV
    if not csv_path.exists():
        raise DataError(f"{csv_path}: not found; face_crop needs the face boxes of every image: "
                        f"run python detect_faces.py --face_dirs {folder}")
    try:
        table = pd.read_csv(csv_path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{csv_path}: cannot parse CSV ({e}); rerun python detect_faces.py --face_dirs {folder}")
    missing = [c for c in FACE_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"{csv_path}: missing column(s) {missing}; found {list(table.columns)}")
    check_faces_table(table, csv_path)
    return {image_key(Path(folder, image)): row for image, row in zip(table["image"], table.itertuples(index=False))}


def check_faces_table(table, csv_path):
    """A faces.csv edited by hand or left from other images would crop the wrong place (or
    crash far from its cause): every row names an existing image once, has found 0 or 1 and,
    when found, a positive image size and a box x1 < x2, y1 < y2 (an unreadable image's row has
    found 0 and no size). Makes those columns numbers."""
    rerun = f"rerun python detect_faces.py --face_dirs {csv_path.parent}"
    repeated = table["image"][table["image"].duplicated()].unique().tolist()
    if repeated:
        raise DataError(f"{csv_path}: image(s) listed more than once: {repeated[:5]}; {rerun}")
    gone = [image for image in table["image"] if not (csv_path.parent / image).is_file()]
    if gone:
        raise DataError(f"{csv_path}: {len(gone)} row(s) for images not in {csv_path.parent}, e.g. {gone[:3]}; {rerun}")
    columns = ["found", "width", "height", "x1", "y1", "x2", "y2"]
    values = table[columns].apply(pd.to_numeric, errors="coerce")
    found = values["found"] == 1
    good_face = ((values["width"] > 0) & (values["height"] > 0) & (values["x1"] < values["x2"])
                 & (values["y1"] < values["y2"]))  # NaN compares False
    bad = ~values["found"].isin([0, 1]) | (found & ~good_face)
    if bad.any():
        raise DataError(f"{csv_path}: line(s) {(np.flatnonzero(bad) + 2).tolist()[:5]}: found must be 0 or 1, and a "
                        f"found face needs width and height above 0 and a box with x1 < x2 and y1 < y2; {rerun}")
    table[columns] = values
    if FILE_BYTES in table.columns:
        table[FILE_BYTES] = pd.to_numeric(table[FILE_BYTES], errors="coerce")


def face_box(face, margin, aspect):
    """The crop around a detected face: its box grown by margin (a fraction of its size) on each
    side, widened or heightened to the model's aspect ratio (w / h) around the same centre,
    shrunk (aspect kept) where it is larger than the image, and moved inside the image, so a
    crop never adds borders. Fractions of the image size (left, top, right, bottom)."""
    cx, cy = (face.x1 + face.x2) / 2, (face.y1 + face.y2) / 2
    w, h = (face.x2 - face.x1) * (1 + 2 * margin), (face.y2 - face.y1) * (1 + 2 * margin)
    w, h = max(w, h * aspect), max(h, w / aspect)
    fit = min(1.0, face.width / w, face.height / h)
    w, h = w * fit, h * fit

    def place(center, length, limit):
        start = min(max(center - length / 2, 0.0), limit - length)
        return start / limit, (start + length) / limit

    (left, right), (top, bottom) = place(cx, w, face.width), place(cy, h, face.height)
    return (left, top, right, bottom)


def crop_boxes(paths, cfg):
    """Per image, the box decode_image cuts: with face_crop, the detected face with face_margin
    (images without a detected face get the median face box of their folder's faces.csv, so
    training, validation, inference and report agree, and are counted);
    otherwise the center_crop fraction; a folder whose faces.csv has no face at all is used whole.
    Returns (boxes, {folder: (images, without a face, whether its faces.csv has any face)})."""
    if not cfg["face_crop"]:
        return [center_box(cfg["center_crop"])] * len(paths), {}
    aspect = cfg["resize"][1] / cfg["resize"][0]
    folders = [dataset_folder(p) for p in paths]
    faces = {folder: read_faces(folder) for folder in dict.fromkeys(folders)}
    rows = [faces[folder].get(image_key(path)) for path, folder in zip(paths, folders)]
    for path, folder, face in zip(paths, folders, rows):
        if face is None:
            raise DataError(f"{folder / FACES_CSV}: no row for {path}; run python detect_faces.py --face_dirs {folder} again")
    check_faces_current(paths, rows, folders)
    boxes = [face_box(face, cfg["face_margin"], aspect) if face.found else None for face in rows]
    counts, typical = {}, {}
    for folder, folder_rows in faces.items():  # the median over the whole folder: the same for any subset of it
        found = [face_box(face, cfg["face_margin"], aspect) for face in folder_rows.values() if face.found]
        typical[folder] = tuple(np.median(found, axis=0)) if found else FULL_IMAGE
        missed = sum(box is None for box, f in zip(boxes, folders) if f == folder)
        counts[folder] = (folders.count(folder), missed, bool(found))
    return [box or typical[folder] for box, folder in zip(boxes, folders)], counts


def check_faces_current(paths, rows, folders):
    """faces.csv boxes are pixels of the image detect_faces.py saw, kept as fractions of its size.
    An image replaced since would be cut in the wrong place, silently, so each image's file size
    in bytes (where its row recorded one: a replacement of the same pixel size is a different
    file) and its pixel size are compared with its row (an image that could not be read then
    must still fail to decode)."""
    stale = []
    for path, face, folder in zip(paths, rows, folders):
        recorded = getattr(face, FILE_BYTES, None)
        if recorded is not None and not pd.isna(recorded) and (now := os.stat(path).st_size) != recorded:
            stale.append((folder, f"{path} (a file of {now} bytes, was {recorded:.0f})"))
            continue
        sizes = header_sizes(path)
        if sizes is None:
            continue  # unreadable: decoding names it
        (width, height) = sizes[0]
        if pd.isna(face.width):
            if is_readable(path):
                stale.append((folder, f"{path} ({width}x{height}, unreadable then)"))
        elif (face.width, face.height) not in sizes:
            stale.append((folder, f"{path} ({width}x{height}, was {face.width:.0f}x{face.height:.0f})"))
    if stale:
        folder = stale[0][0]
        images = [image for f, image in stale if f == folder]
        raise DataError(f"{folder / FACES_CSV}: {len(images)} image(s) changed since detect_faces.py found their faces, "
                        f"e.g. {'; '.join(images[:3])}, so their face boxes would cut the wrong place; run python "
                        f"detect_faces.py --face_dirs {folder} again")


def log_face_counts(counts):
    for folder, (total, missed, any_face) in counts.items():
        if any_face:
            log.info("face crop: %s: a face in %d of %d images; %d without one use the folder's median face box",
                     folder, total - missed, total, missed)
        else:
            log.warning("face crop: %s: its %s has no face in any image, so its %d images are used whole, not "
                        "cropped; run python detect_faces.py --face_dirs %s again", folder, FACES_CSV, total, folder)


# ---------------------------------------------------------------------------------------------
# Decoding and the decoded-image cache
EXIF_ORIENTATION = 0x0112
CUDA_CACHE_WORKERS = 4  # cache-reading workers on a CUDA device (--cache_workers -1), at most half the cores


def read_rgb(path):
    """An image file as an RGB Pillow image, or a DataError naming the file."""
    try:
        with Image.open(path) as img:
            if img.getexif().get(EXIF_ORIENTATION, 1) != 1:  # a photo stored sideways with a rotation tag
                img = ImageOps.exif_transpose(img)
            if img.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grey: convert("RGB") would clip it to white
                img = Image.fromarray(np.clip(np.asarray(img, dtype=np.int64) >> 8, 0, 255).astype(np.uint8))
            return img.convert("RGB")
    except FileNotFoundError:
        where = "" if Path(path).is_absolute() else f" (a relative path, read from {Path.cwd()})"
        raise DataError(f"{path}: image not found{where}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: unreadable, truncated or oversized image ({e})")


def header_sizes(path):
    """The (width, height) read_rgb can give an image, from its header alone (about 30
    microseconds): the upright size where the EXIF rotation can be read there (JPEG, including
    XMP; a PNG whose EXIF comes before its pixels), else both orientations, stored size first
    (a PNG's getexif() decodes the whole image to look for EXIF after the pixels, 4 ms at
    384x512). None when the image cannot be opened."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            if img.format == "PNG" and "exif" not in img.info:
                return [(width, height), (height, width)]
            turned = img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)  # the four that swap the sides
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    return [(height, width) if turned else (width, height)]


def is_readable(path):
    try:
        read_rgb(path)
    except DataError:
        return False
    return True


def decode_image(path, size, box=FULL_IMAGE):
    """Read an image as RGB, cut the box (left, top, right, bottom as fractions of its width and
    height), resize to size (h, w); returns a uint8 array (h, w, 3). Raises DataError naming the
    file if it cannot be read."""
    img = read_rgb(path)
    if tuple(box) != FULL_IMAGE:
        w, h = img.size
        img = img.crop((round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h)))
    return np.array(img.resize((size[1], size[0]), Image.BILINEAR), dtype=np.uint8)


class _DecodeAll(Dataset):
    """Decodes images for building the cache; returns (index, array or None, error)."""

    def __init__(self, paths, size, boxes):
        self.paths, self.size, self.boxes = paths, size, boxes

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return i, decode_image(self.paths[i], self.size, self.boxes[i]), ""
        except DataError as e:
            return i, None, str(e)


def cache_key(paths, size, boxes):
    """Changes whenever a file, its size or modification time, the order, the size or a crop box changes."""
    # the tag names the array layout and decoder version ("upright": EXIF rotation and 16-bit
    # images decoded as they look), so caches of an older decoder are not reused
    h = hashlib.sha1(json.dumps(["chw-upright", list(size)]).encode())
    for p, box in zip(paths, boxes):
        st = os.stat(p)
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}|{','.join(f'{v:.5f}' for v in box)}\n".encode())
    return h.hexdigest()[:20]


def build_cache(paths, size, boxes, cache_dir, num_workers=0):
    """Decode every image once (cut to its box) into cache_dir/<key>.npy (uint8, N x 3 x H x W)
    and return (path to the array file, list of per-image error messages, '' for a good image).
    Written under a temporary name and renamed when complete, so an interrupted build never
    leaves a half-written cache behind; later runs with the same files, boxes and size reuse it."""
    from tqdm import tqdm

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(paths, size, boxes)
    array_path, meta_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    if array_path.exists() and meta_path.exists():
        return array_path, json.loads(meta_path.read_text())["errors"]
    tmp_path, tmp_meta = (cache_dir / f"{key}.tmp{os.getpid()}{suffix}" for suffix in (".npy", ".json"))
    errors = [""] * len(paths)
    loader = DataLoader(_DecodeAll(paths, tuple(size), boxes), batch_size=32,
                        num_workers=num_workers, collate_fn=list)  # list, not a lambda: workers may be spawned
    bar = tqdm(loader, desc=f"decoding {len(paths)} images into the cache", unit="batch", leave=False,
               disable=not sys.stderr.isatty())
    try:
        array = np.lib.format.open_memmap(tmp_path, mode="w+", dtype=np.uint8, shape=(len(paths), 3, *size))
        for batch in bar:
            for i, img, err in batch:
                if img is not None:  # stored channels-first, as the model reads it: no transpose per epoch
                    array[i] = img.transpose(2, 0, 1)
                errors[i] = err
        array.flush()
        del array
        tmp_meta.write_text(json.dumps({"size": list(size), "count": len(paths), "errors": errors}))
        os.replace(tmp_meta, meta_path)
        os.replace(tmp_path, array_path)  # last: the cache counts only once both files are complete
    except BaseException:  # Ctrl-C too: an unfinished array (gigabytes at full size) is never left behind
        for path in (tmp_path, tmp_meta):
            path.unlink(missing_ok=True)
        raise
    return array_path, errors


def check_decode_errors(paths, errors, skip_bad_images):
    """Raise on the first unreadable image, or (skip_bad_images) return the indices to keep and
    the skipped (path, error) list, which the caller writes to the run folder."""
    bad = [(p, e) for p, e in zip(paths, errors) if e]
    if bad and not skip_bad_images:
        raise DataError(f"{bad[0][1]} ({len(bad)} bad image(s) in all; train.py --skip_bad_images lists and skips "
                        "bad training images, but not eval images: a submission needs every one)")
    keep = [i for i, e in enumerate(errors) if not e]
    return keep, bad


def cache_readers(cfg, device):
    """Worker processes that read a cached dataset: cfg's cache_workers, where the default (-1)
    picks by device. On the 2-core CPU a cached batch, one array read plus cheap flips, was
    faster in the main process (about 6,000 images/s at 384x512 in make bench) than through 2
    workers (about 1,950), which pay for start-up, shared memory and pickling and take cores from
    the model. On a GPU the main process also launches the model's kernels, and loading in it
    holds them back: on one H100, 4 workers trained the recommended recipe 1.28x faster at batch
    32 (BENCHMARKS.md, session 17)."""
    if cfg["cache_workers"] >= 0:
        return cfg["cache_workers"]
    if cfg["cache_workers"] != -1:
        raise SystemExit(f"error: --cache_workers must be -1 (by device), 0 or more, got {cfg['cache_workers']}")
    return min(CUDA_CACHE_WORKERS, usable_cores() // 2) if device.type == "cuda" else 0


def usable_cores():
    """The cores this process may run on (a container or CPU affinity can allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class FaceDataset(Dataset):
    """Images (from a cache array file, or decoded on each access) with their labels.
    Items: (uint8 image tensor C x H x W transformed by `transform`, label, age, soft): soft is
    the image's 18 class probabilities when it was labelled with them, else NaN."""

    def __init__(self, paths, labels, ages, size, boxes, transform, cache_file=None, rows=None, soft=None):
        self.paths, self.labels, self.ages = list(paths), np.asarray(labels), np.asarray(ages, np.float32)
        self.soft = np.asarray(np.full((len(self.paths), NUM_CLASSES), np.nan) if soft is None else soft, np.float32)
        self.size, self.boxes, self.transform = tuple(size), boxes, transform  # boxes: when decoding here
        self.cache_file, self.rows = cache_file, rows  # rows: index of each item in the cache array
        self._array = None  # opened lazily, once per worker process

    def __len__(self):
        return len(self.paths)

    def loader_workers(self, cfg, device):
        """Worker processes for this dataset's loader: cfg's num_workers when it decodes images,
        cache_readers when it reads the cache."""
        return cfg["num_workers"] if self.cache_file is None else cache_readers(cfg, device)

    def cache_array(self):
        if self._array is None:
            self._array = np.load(self.cache_file, mmap_mode="r")
        return self._array

    def item(self, image, i):
        return self.transform(image), int(self.labels[i]), self.ages[i], self.soft[i]

    def __getitem__(self, i):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices):
        """A batch of items (the DataLoader calls this instead of __getitem__ per index): decoded
        here (uint8, 3 x H x W), or read from the cache in one read of the array for the batch."""
        if self.cache_file is None:
            images = [torch.from_numpy(np.ascontiguousarray(decode_image(self.paths[i], self.size, self.boxes[i])
                                                            .transpose(2, 0, 1))) for i in indices]
        else:
            images = torch.from_numpy(self.cache_array()[[self.rows[i] for i in indices]])
        return [self.item(image, i) for image, i in zip(images, indices)]


def open_cache(paths, cfg):
    """The decode cache of a list of images: (array file, {path: row}, {path: error}). Build it
    once over every image a run uses, then hand it to make_dataset for each subset (folds,
    validation, refit), so no image is decoded twice."""
    boxes, counts = crop_boxes(paths, cfg)
    log_face_counts(counts)
    cache_file, errors = build_cache(paths, cfg["resize"], boxes, cfg["cache_dir"], cfg["num_workers"])
    return cache_file, {p: i for i, p in enumerate(paths)}, dict(zip(paths, errors))


def decode_errors(paths, cfg, boxes=None):
    """The decoding error of each image ('' if good), through the decode cache when there is one
    (which then need not decode them again). boxes: their crop_boxes, when the caller has them."""
    if cfg["cache_dir"]:
        _, _, error_of = open_cache(paths, cfg)
        return [error_of[p] for p in paths]
    if boxes is None:
        boxes, _ = crop_boxes(paths, cfg)
    decoder = _DecodeAll(paths, tuple(cfg["resize"]), boxes)
    return [decoder[i][2] for i in range(len(paths))]


def make_dataset(table, cfg, transform, skip_log=None, cache=None):
    """A FaceDataset over a table with image_path (and label/age when known), read from the
    decode cache when cfg['cache_dir'] is set (`cache` from open_cache, or one built for this
    table). Unreadable images raise, or with skip_bad_images are dropped and appended to
    skip_log (a list) so the caller can write them out."""
    paths = table["image_path"].tolist()
    labels = table["label"].to_numpy() if "label" in table else np.zeros(len(table), int)
    ages = np.where(age_known(table), table["age"], np.nan) if "age" in table else np.zeros(len(table))
    soft = table[PROB_COLUMNS].to_numpy(np.float32) if PROB_COLUMNS[0] in table else None
    size, rows, boxes = tuple(cfg["resize"]), None, None
    if cfg["cache_dir"]:
        cache_file, row_of, error_of = cache or open_cache(paths, cfg)
        rows, errors = [row_of[p] for p in paths], [error_of[p] for p in paths]
    else:
        boxes, counts = crop_boxes(paths, cfg)
        log_face_counts(counts)
        cache_file = None
        # no cache: with skipping, one decoding pass finds the images to skip; without, a bad
        # image raises, naming the file, when it is read
        errors = decode_errors(paths, cfg, boxes) if cfg["skip_bad_images"] else [""] * len(paths)
    keep, bad = check_decode_errors(paths, errors, cfg["skip_bad_images"])
    if skip_log is not None:
        skip_log.extend(bad)

    def pick(values):
        return None if values is None else [values[i] for i in keep]

    return FaceDataset([paths[i] for i in keep], labels[keep], ages[keep], size, pick(boxes), transform,
                       cache_file=cache_file, rows=pick(rows), soft=None if soft is None else soft[keep])


# ---------------------------------------------------------------------------------------------
# Augmentation (on uint8 tensors, after the cache) and batch mixing
def build_transform(preset, size, mean, std):
    """An augmentation preset as (sample_transform, batch_transform).
    sample_transform runs per image in the loader workers on uint8 tensors (C x H x W) and does
    only the geometric steps, so workers hand over small uint8 images; batch_transform runs on
    the model's device on the uint8 batch and does the float work: scaling, per-image colour
    jitter and noise, normalization, random erasing.
    plain: normalize only (validation and inference always use it); light: flip and mild
    brightness/contrast; strong: random resized crop, flip, grayscale, colour jitter, Gaussian
    noise and random erasing (the techniques of the competition reports)."""
    if preset == "plain":
        sample = v2.Identity()
    elif preset == "light":
        sample = v2.RandomHorizontalFlip()
    elif preset == "strong":
        ratio = size[1] / size[0]
        sample = v2.Compose([v2.RandomResizedCrop(tuple(size), scale=(0.7, 1.0), ratio=(ratio * 0.9, ratio * 1.1),
                                                  antialias=True), v2.RandomHorizontalFlip(), v2.RandomGrayscale(0.1)])
    else:
        raise ValueError(f"augmentation '{preset}' is not plain, light or strong")
    return sample, BatchTransform(preset, mean, std)


class BatchTransform:
    """The float part of a preset, on a uint8 batch (B x C x H x W) on any device; every image
    draws its own jitter factors (from torch's global generator, reseeded every epoch)."""

    JITTER = {"plain": (0.0, 0.0, 0.0), "light": (0.1, 0.1, 0.0), "strong": (0.2, 0.2, 0.2)}

    def __init__(self, preset, mean, std):
        self.preset, self.mean, self.std = preset, torch.tensor(mean), torch.tensor(std)
        self.erase = v2.RandomErasing(p=0.25)

    def __call__(self, images):
        x = images.float().div_(255)
        brightness, contrast, saturation = self.JITTER[self.preset]
        if brightness or contrast or saturation:
            x = color_jitter(x, brightness, contrast, saturation)
        if self.preset == "strong":
            noisy = (torch.rand(x.size(0), 1, 1, 1, device=x.device) < 0.5).float()
            x = x + noisy * 0.03 * torch.randn_like(x)
        x = (x - self.mean.to(x.device)[:, None, None]) / self.std.to(x.device)[:, None, None]
        if self.preset == "strong":
            x = torch.stack([self.erase(image) for image in x])
        return x


def color_jitter(x, brightness, contrast, saturation):
    """Per-image brightness, contrast and saturation factors drawn from 1 +- amount, on a float
    batch in [0, 1] (like torchvision's ColorJitter, but each image of the batch its own)."""
    def factor(amount):
        return 1 + (torch.rand(x.size(0), 1, 1, 1, device=x.device) * 2 - 1) * amount

    def gray(t):
        return (0.299 * t[:, 0] + 0.587 * t[:, 1] + 0.114 * t[:, 2]).unsqueeze(1)

    x = (x * factor(brightness)).clamp(0, 1)
    if contrast:
        mean = gray(x).mean((1, 2, 3), keepdim=True)
        x = ((x - mean) * factor(contrast) + mean).clamp(0, 1)
    if saturation:
        g = gray(x)
        x = ((x - g) * factor(saturation) + g).clamp(0, 1)
    return x


def mix_batch(images, mode, alpha):
    """Mix a batch with a shuffled copy of itself. Returns (images, permutation, lam): the loss
    is lam * loss(targets) + (1 - lam) * loss(targets[permutation]).
    mixup blends whole images; cutmix pastes a random box; vertical_cutmix takes the left half
    from one face and the right half from another (lam = share of area kept).
    Draws from torch's global generator, which train.py reseeds every epoch."""
    perm = torch.randperm(images.size(0)).to(images.device)
    if mode == "mixup":
        lam = float(torch.distributions.Beta(alpha, alpha).sample()) if alpha > 0 else 0.5
        return lam * images + (1 - lam) * images[perm], perm, lam
    h, w = images.shape[-2:]
    mixed = images.clone()
    if mode == "vertical_cutmix":
        mixed[..., w // 2:] = images[perm][..., w // 2:]
        return mixed, perm, (w // 2) / w
    if mode == "cutmix":
        lam = float(torch.distributions.Beta(alpha, alpha).sample()) if alpha > 0 else 0.5
        cut_h, cut_w = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
        cy, cx = (int(torch.randint(n, (1,))) for n in (h, w))
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        mixed[..., y0:y1, x0:x1] = images[perm][..., y0:y1, x0:x1]
        return mixed, perm, 1 - (y1 - y0) * (x1 - x0) / (h * w)
    raise ValueError(f"mix '{mode}' is not none, mixup, cutmix or vertical_cutmix")


def class_balanced_weights(labels):
    """Per-sample weights 1 / (count of its class) for a WeightedRandomSampler."""
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    return torch.as_tensor(1.0 / counts[labels], dtype=torch.double)
