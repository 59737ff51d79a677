"""dataset.py: reading and checking the competition layout, labels, corrections, extra data,
splits by person, augmentation, batch mixing, the decoded-image cache and bad input."""
import csv
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import dataset as D
from config import default_config, parse_config
from make_sample_data import make_sample_dataset

ROOT = Path(__file__).resolve().parents[1]
SIZE = (24, 32)  # width x height of the generated images
RESIZE = [16, 12]  # height x width fed to the model
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def make_data(path, people=3, eval_people=1, seed=0, image_ext=".jpg"):
    return make_sample_dataset(path, n_train_people=people, n_eval_people=eval_people, size=SIZE, seed=seed,
                               image_ext=image_ext)


def make_cfg(data_dir, tmp_path, **kw):
    cfg = default_config("train")
    cfg.update(data_dir=str(data_dir), cache_dir=str(tmp_path / "cache"), resize=list(RESIZE), num_workers=0,
               mean=MEAN, std=STD, val_ratio=0.2, extra_data=[], corrections="", drop_ages=[])
    cfg.update(kw)
    return cfg


def people_table(root):
    return pd.read_csv(root / "train" / "train.csv", dtype=str, keep_default_na=False)


def rewrite_train_csv(root, **columns):
    """Replace whole columns of train.csv (lists in row order)."""
    table = people_table(root)
    for name, values in columns.items():
        table[name] = [str(v) for v in values]
    table.to_csv(root / "train" / "train.csv", index=False)


def person_folder(root, index=0):
    return root / "train" / "images" / people_table(root)["path"][index]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """6 training people (one per gender x age band), 2 eval people; read only."""
    return make_data(tmp_path_factory.mktemp("tiny"), people=6, eval_people=2, seed=1)


@pytest.fixture(scope="module")
def thirty(tmp_path_factory):
    """30 training people (5 per gender x age band) for 5-fold splits; read only."""
    return make_data(tmp_path_factory.mktemp("thirty"), people=30, eval_people=0, seed=2)


@pytest.fixture
def fresh(tmp_path):
    """A 3-person dataset a test may damage."""
    return make_data(tmp_path / "data", people=3, eval_people=1, seed=3)


# ---------------------------------------------------------------------------------------------
# 1. Reading and labels
@pytest.mark.parametrize("ext", [".jpg", ".jpeg", ".png"])
def test_reads_every_image_extension(tmp_path, ext):
    root = make_data(tmp_path, people=2, eval_people=0, image_ext=ext)
    images = D.read_train_images(root / "train")
    assert len(images) == 14
    assert all(p.endswith(ext) for p in images["image_path"])
    assert images.groupby("id")["file"].apply(sorted).map(tuple).tolist() == [tuple(sorted(D.MASK_FILES))] * 2
    assert images["mask"].value_counts().to_dict() == {0: 10, 1: 2, 2: 2}
    assert D.decode_image(images["image_path"][0], RESIZE).shape == (*RESIZE, 3)


def test_sample_data_replaces_an_old_sample_but_never_other_data(tmp_path):
    sample = make_sample_dataset(tmp_path / "sample", n_train_people=3, n_eval_people=1, size=SIZE)
    (sample / "train" / "extra.txt").write_text("from the old sample")
    make_sample_dataset(sample, n_train_people=3, n_eval_people=1, size=SIZE)  # an old sample is replaced
    assert not (sample / "train" / "extra.txt").exists() and (sample / "train" / "train.csv").is_file()
    real = tmp_path / "real"
    (real / "train").mkdir(parents=True)
    (real / "train" / "train.csv").write_text("id,gender,race,age,path\n")
    with pytest.raises(SystemExit, match="already holds train/ or eval/ that make_sample_data.py did not write"):
        make_sample_dataset(real, n_train_people=3, n_eval_people=1, size=SIZE)
    assert (real / "train" / "train.csv").read_text() == "id,gender,race,age,path\n"


def test_upper_case_extension_is_accepted(fresh):
    folder = person_folder(fresh)
    (folder / "mask1.jpg").rename(folder / "mask1.JPG")
    (folder / "normal.jpg").rename(folder / "normal.Jpeg")
    images = D.read_train_images(fresh / "train")
    mine = images[images["image_path"].str.startswith(str(folder))].set_index("file")
    assert len(images) == 21 and len(mine) == 7
    assert mine.at["mask1", "image_path"].endswith("mask1.JPG") and mine.at["mask1", "mask"] == 0
    assert mine.at["normal", "image_path"].endswith("normal.Jpeg") and mine.at["normal", "mask"] == 2


def test_train_table_matches_train_csv_and_generated_classes(tiny):
    images = D.read_train_images(tiny / "train")
    people = people_table(tiny)
    assert len(images) == 7 * len(people) and set(images["source"]) == {"train"}
    by_id = images.drop_duplicates("id").set_index("id")
    for rec in people.itertuples():
        assert by_id.at[rec.id, "gender"] == D.GENDERS[rec.gender]
        assert by_id.at[rec.id, "age"] == int(rec.age)
    labels = D.add_labels(images, 60)["label"].to_numpy()
    counts = json.loads((tiny / "build_info.json").read_text())["train"]["class_counts"]
    assert np.bincount(labels, minlength=18).tolist() == counts


def test_images_folder_is_accepted_as_data_dir(tiny):
    a = D.read_train_images(tiny / "train")
    b = D.read_train_images(tiny / "train" / "images")
    pd.testing.assert_frame_equal(a, b)


def test_the_eval_folder_beside_a_training_folder_given_from_inside_it(tiny, monkeypatch):
    """--data_dir . (or images, or train/..-style paths) from inside the training folder still
    finds eval/ beside it: Path('.').parent is '.' again."""
    monkeypatch.chdir(tiny / "train")
    for data_dir in (".", "images", "images/.."):
        assert Path(D.eval_folder({"eval_dir": "", "data_dir": data_dir})).resolve() == (tiny / "eval").resolve()
    assert len(D.read_train_images(".")) == len(D.read_train_images(tiny / "train"))


def test_read_eval_images_keeps_info_order(tiny):
    info = pd.read_csv(tiny / "eval" / "info.csv", dtype=str)
    table = D.read_eval_images(tiny / "eval")
    assert table["ImageID"].tolist() == info["ImageID"].tolist()
    assert table["ImageID"].tolist() != sorted(info["ImageID"])  # info.csv is shuffled: order is kept, not sorted
    assert [Path(p).name for p in table["image_path"]] == info["ImageID"].tolist()
    assert all(Path(p).is_file() for p in table["image_path"])


def test_encode_decode_round_trip():
    labels = np.arange(18)
    mask, gender, band = D.decode_class(labels)
    assert set(mask) == {0, 1, 2} and set(gender) == {0, 1} and set(band) == {0, 1, 2}
    assert len(set(zip(mask, gender, band))) == 18
    assert D.encode_class(mask, gender, band).tolist() == labels.tolist()
    for label in range(18):
        m, g, b = D.decode_class(label)
        assert int(D.encode_class(m, g, b)) == label == m * 6 + g * 3 + b
    t_mask, t_gender, t_band = D.decode_class(torch.arange(18))
    assert t_mask.tolist() == mask.tolist() and t_gender.tolist() == gender.tolist() and t_band.tolist() == band.tolist()
    assert D.class_name(17) == "not_wear/female/>=60" and D.class_name(0) == "wear/male/<30"


def test_age_band_boundaries():
    assert D.age_band([29, 30, 59, 60], 60).tolist() == [0, 1, 1, 2]
    assert D.age_band([29, 30, 57, 58, 59, 60], 58).tolist() == [0, 1, 1, 2, 2, 2]
    assert int(D.age_band(45)) == 1


# ---------------------------------------------------------------------------------------------
# 2. Relabeling and cleaning
def test_age_threshold_relabels_through_load_training_images(fresh, tmp_path):
    rewrite_train_csv(fresh, age=[29, 58, 60])
    bands = {}
    for threshold in (60, 58):
        images = D.load_training_images(make_cfg(fresh / "train", tmp_path, age_threshold=threshold, val_ratio=0))
        assert (images["label"] == D.encode_class(images["mask"], images["gender"], images["age_band"])).all()
        bands[threshold] = images.drop_duplicates("id").set_index("age")["age_band"].to_dict()
    assert bands[60] == {29: 0, 58: 1, 60: 2}
    assert bands[58] == {29: 0, 58: 2, 60: 2}


def test_validation_keeps_the_true_classes_whatever_the_threshold(thirty, tmp_path):
    """Training with age_threshold 58 labels a 58-year-old as >=60, but validation scores the
    real task, and the folds do not move with the threshold."""
    runs = {t: D.load_training_images(make_cfg(thirty / "train", tmp_path, age_threshold=t)) for t in (60, 58)}
    assert (runs[60]["fold"] == runs[58]["fold"]).all()
    images = runs[58]
    old = images["age"].between(58, 59)
    assert old.any() and (images.loc[old, "age_band"] == 2).all()
    for fold in range(5):
        train, valid = D.split_train_valid(images, fold)
        mask, gender, band = D.decode_class(valid["label"].to_numpy())
        assert (band == D.age_band(valid["age"], 60)).all()
        assert (train["label"] == D.encode_class(train["mask"], train["gender"], train["age_band"])).all()


def test_drop_ages_leave_training_only(thirty, tmp_path):
    images = D.load_training_images(make_cfg(thirty / "train", tmp_path))
    drop = [29, 60]
    assert images["age"].isin(drop).any()
    dropped_in_valid = 0
    for fold in range(5):
        train, valid = D.split_train_valid(images, fold, drop)
        assert not train["age"].isin(drop).any()
        expected_valid = images[images["fold"] == fold]
        assert len(valid) == len(expected_valid)  # validation keeps every age
        assert len(train) == ((images["fold"] != fold) & ~images["age"].isin(drop)).sum()
        dropped_in_valid += valid["age"].isin(drop).sum()
    assert dropped_in_valid == images["age"].isin(drop).sum()  # each dropped image validates once
    train, valid = D.split_train_valid(images, None, drop)
    assert valid is None and len(train) == (~images["age"].isin(drop)).sum()


def test_drop_ages_from_the_command_line(thirty, tmp_path):
    """--drop_ages 29 60 arrives as strings (an empty-list default has no item type)."""
    cfg = parse_config("train", ["--data_dir", str(thirty / "train"), "--drop_ages", "29", "60",
                                 "--cache_dir", str(tmp_path / "cache")])
    images = D.load_training_images(cfg)
    train, _ = D.split_train_valid(images, None, cfg["drop_ages"])
    assert images["age"].isin([29, 60]).any()
    assert not train["age"].isin([29, 60]).any()


def write_corrections(path, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["id", "field", "value"]] + rows)
    return str(path)


def test_corrections_are_applied_and_logged(tmp_path, caplog):
    root = make_data(tmp_path / "data", people=6, eval_people=0, seed=4)
    people = people_table(root)
    ids, genders = people["id"].tolist(), people["gender"].tolist()
    male = ids[genders.index("male")]
    others = [i for i in ids if i != male]
    flip, age_fix, swapped = others[:3]
    corrections = write_corrections(tmp_path / "fix.csv", [
        [flip, "gender", "flip"], [male, "gender", "female"], [age_fix, "age", "65"],
        [swapped, "swap", "incorrect_mask normal"]])
    before = D.add_labels(D.read_train_images(root / "train"), 60)
    with caplog.at_level(logging.INFO, logger="mask"):
        after = D.load_training_images(make_cfg(root / "train", tmp_path, corrections=corrections, val_ratio=0))
    lines = [r.getMessage() for r in caplog.records if r.name == "mask" and r.getMessage().startswith("correction")]
    assert len(lines) == 4
    for pid in (flip, male, age_fix, swapped):
        assert sum(pid in line for line in lines) == 1

    b, a = before.set_index(["id", "file"]), after.set_index(["id", "file"])
    assert (a.loc[flip, "gender"] == 1 - b.loc[flip, "gender"]).all()
    assert (a.loc[male, "gender"] == 1).all() and (b.loc[male, "gender"] == 0).all()
    assert (a.loc[age_fix, "age"] == 65).all() and (a.loc[age_fix, "age_band"] == 2).all()
    assert a.at[(swapped, "incorrect_mask"), "image_path"] == b.at[(swapped, "normal"), "image_path"]
    assert a.at[(swapped, "normal"), "image_path"] == b.at[(swapped, "incorrect_mask"), "image_path"]
    assert a.at[(swapped, "incorrect_mask"), "mask"] == 1 and a.at[(swapped, "normal"), "mask"] == 2
    assert (a.loc[(swapped, "normal"), "label"] - a.loc[(swapped, "incorrect_mask"), "label"]) == 6
    untouched = [i for i in ids if i not in (flip, male, age_fix, swapped)]
    pd.testing.assert_frame_equal(a.loc[untouched, b.columns].sort_index(), b.loc[untouched].sort_index())


def test_correction_for_an_unknown_id_is_a_warning(fresh, tmp_path, caplog):
    pid = people_table(fresh)["id"][0]
    corrections = write_corrections(tmp_path / "fix.csv", [["999999", "gender", "flip"], [pid, "age", "33"]])
    with caplog.at_level(logging.INFO, logger="mask"):
        images = D.read_train_images(fresh / "train", corrections)
    expected = D.read_train_images(fresh / "train")
    expected.loc[expected["id"] == pid, "age"] = 33
    pd.testing.assert_frame_equal(images, expected)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "999999" in warnings[0] and "fix.csv" in warnings[0]


def test_corrections_none_of_whose_ids_is_in_the_data_are_an_error(fresh, tmp_path):
    pid = people_table(fresh)["id"][0]  # '000000' style ids; a spreadsheet saves them as '0'
    corrections = write_corrections(tmp_path / "fix.csv", [[pid.lstrip("0") or "0", "gender", "flip"]])
    message = error_of(D.read_train_images, fresh / "train", corrections)
    assert "fix.csv: none of its 1 ids is in the data; ids are compared as text" in message
    corrections = write_corrections(tmp_path / "other.csv", [["777777", "gender", "flip"]])
    assert "other.csv: none of its 1 ids is in the data; corrections for other data?" in error_of(
        D.read_train_images, fresh / "train", corrections)


@pytest.mark.parametrize("row, words", [
    (["gender", "unknown"], ["gender", "unknown"]), (["age", "old"], ["age", "old"]),
    (["swap", "mask1 mask9"], ["mask9"]), (["race", "Asian"], ["race"])])
def test_bad_corrections_are_errors_naming_file_and_line(fresh, tmp_path, row, words):
    pid = people_table(fresh)["id"][0]
    corrections = write_corrections(tmp_path / "fix.csv", [[pid, *row]])
    with pytest.raises(D.DataError) as exc:
        D.read_train_images(fresh / "train", corrections)
    assert "fix.csv: line 2" in str(exc.value)
    for word in words:
        assert word in str(exc.value)


@pytest.mark.parametrize("rows", [
    [["gender", "flip"], ["gender", "flip"]],  # the second undoes the first
    [["gender", "male"], ["gender", "female"]],
    [["age", "33"], ["age", "45"]],
    [["swap", "incorrect_mask normal"], ["swap", "normal incorrect_mask"]],
])
def test_a_second_correction_of_one_label_is_an_error(fresh, tmp_path, rows):
    pid = people_table(fresh)["id"][0]
    corrections = write_corrections(tmp_path / "fix.csv", [[pid, *row] for row in rows])
    message = error_of(D.read_train_images, fresh / "train", corrections)
    assert f"fix.csv: line 3: a second {rows[0][0]} correction of id {pid} (line 2); keep one" in message


def test_the_same_age_or_gender_given_twice_is_applied_once(fresh, tmp_path):
    """Two merged correction lists may repeat a fix: the same value is not a contradiction."""
    pid = people_table(fresh)["id"][0]
    corrections = write_corrections(tmp_path / "fix.csv", [[pid, "age", "70"], [pid, "gender", "female"],
                                                           [pid, "age", "70"], [pid, "gender", "Female"]])
    images = D.read_train_images(fresh / "train", corrections)
    assert (images.loc[images["id"] == pid, "age"] == 70).all() and (images.loc[images["id"] == pid, "gender"] == 1).all()


def test_two_different_swaps_of_one_person_are_both_applied(fresh, tmp_path):
    pid = people_table(fresh)["id"][0]
    corrections = write_corrections(tmp_path / "fix.csv", [[pid, "swap", "incorrect_mask normal"],
                                                           [pid, "swap", "mask1 mask2"], [pid, "age", "70"]])
    before = D.read_train_images(fresh / "train").set_index(["id", "file"])
    after = D.read_train_images(fresh / "train", corrections).set_index(["id", "file"])
    assert after.at[(pid, "normal"), "image_path"] == before.at[(pid, "incorrect_mask"), "image_path"]
    assert after.at[(pid, "mask1"), "image_path"] == before.at[(pid, "mask2"), "image_path"]
    assert (after.loc[pid, "age"] == 70).all()


@pytest.mark.parametrize("age", ["250", "0", "\u2460"])  # a typo, no age, a circled 1
def test_a_correction_to_an_impossible_age_is_an_error(fresh, tmp_path, age):
    pid = people_table(fresh)["id"][0]
    corrections = write_corrections(tmp_path / "fix.csv", [[pid, "age", age]])
    assert f"fix.csv: line 2: age value '{age}' is not whole years from 1 to 120" in error_of(
        D.read_train_images, fresh / "train", corrections)


def test_shipped_competition_corrections(tmp_path, caplog):
    shipped = ROOT / "corrections" / "competition.csv"
    if not shipped.is_file():
        pytest.skip("corrections/competition.csv is not shipped yet")
    table = pd.read_csv(shipped, dtype=str, keep_default_na=False)
    assert list(table.columns) == ["id", "field", "value"] and len(table) > 0
    assert set(table["field"]) <= {"gender", "age", "swap"}
    assert not table.duplicated(["id", "field"]).any()
    for rec in table.itertuples():
        if rec.field == "gender":
            assert rec.value in ("flip", "male", "female"), rec
        elif rec.field == "age":
            assert rec.value.isdigit(), rec
        else:
            assert len(rec.value.split()) == 2 and set(rec.value.split()) <= set(D.MASK_FILES), rec
    # Give a tiny dataset three of the listed ids and apply the whole file to it.
    pick = [table[table["field"] == f].iloc[0] for f in ("gender", "swap", "age")]
    root = make_data(tmp_path / "data", people=3, eval_people=0, seed=5)
    rewrite_train_csv(root, id=[p["id"] for p in pick])
    before = D.read_train_images(root / "train").set_index(["id", "file"])
    with caplog.at_level(logging.INFO, logger="mask"):
        after = D.read_train_images(root / "train", str(shipped)).set_index(["id", "file"])
    g, s, a = (p["id"] for p in pick)
    assert pick[0]["value"] == "flip" and (after.loc[g, "gender"] == 1 - before.loc[g, "gender"]).all()
    stem_a, stem_b = pick[1]["value"].split()
    assert after.at[(s, stem_a), "image_path"] == before.at[(s, stem_b), "image_path"]
    assert (after.loc[a, "age"] == int(pick[2]["value"])).all()
    records = [r for r in caplog.records if r.name == "mask"]
    assert sum(r.levelno == logging.INFO for r in records) == 3
    assert sum(r.levelno == logging.WARNING and "correction not applied" in r.getMessage()
               for r in records) == len(table) - 3  # ids not in this data


# ---------------------------------------------------------------------------------------------
# 3. Extra training data
def write_label_csv(root, with_age=False):
    """A pseudo-label CSV beside the eval images: path (relative), class, optional age."""
    answers = pd.read_csv(root / "eval" / "answers.csv")
    table = pd.DataFrame({"path": "images/" + answers["ImageID"], "class": answers["ans"]})
    if with_age:  # an age inside each class's band, none of them a BAND_AGES stand-in
        table["age"] = np.take([22, 41, 61], table["class"] % 3)
    path = root / "eval" / ("labels_age.csv" if with_age else "labels.csv")
    table.to_csv(path, index=False)
    return path, table


def test_extra_data_is_training_only(thirty, tiny, tmp_path):
    label_csv, labels = write_label_csv(tiny)
    cfg = make_cfg(thirty / "train", tmp_path, extra_data=[str(tiny / "train"), str(label_csv)])
    images = D.load_training_images(cfg)
    main, extra0, extra1 = (images[images["source"] == s] for s in ("train", "extra0", "extra1"))
    assert len(main) == 30 * 7 and len(extra0) == 6 * 7 and len(extra1) == len(labels)
    assert set(images["source"]) == {"train", "extra0", "extra1"}
    assert (extra0["fold"] == -1).all() and (extra1["fold"] == -1).all() and (main["fold"] >= 0).all()
    assert extra0["id"].str.startswith("extra0:").all() and extra1["id"].str.startswith("extra1:").all()
    assert set(extra0["id"].str[len("extra0:"):]) == set(people_table(tiny)["id"])
    assert not set(extra0["id"]) & set(main["id"])
    assert extra1["label"].tolist() == labels["class"].tolist()
    for fold in [*range(5), None]:
        train, valid = D.split_train_valid(images, fold)
        assert (train["source"] != "train").sum() == len(extra0) + len(extra1)
        if valid is not None:
            assert (valid["source"] == "train").all() and len(valid) > 0


def test_band_only_images_carry_an_unknown_age(thirty, tiny, tmp_path):
    """A label CSV without ages: the dataset hands the loss NaN ages for its rows (real ages for
    the others), and drop_ages does not drop them for their stand-in age."""
    label_csv, labels = write_label_csv(tiny)
    cfg = make_cfg(thirty / "train", tmp_path, extra_data=[str(label_csv)], cache_dir="")
    images = D.load_training_images(cfg)
    train, _ = D.split_train_valid(images, None, drop_ages=list(D.BAND_AGES))
    assert (train["source"] == "extra0").sum() == len(labels)
    dataset = D.make_dataset(train, cfg, D.build_transform("plain", RESIZE, MEAN, STD)[0])
    from_csv = (train["source"] == "extra0").to_numpy()
    assert np.isnan(dataset.ages[from_csv]).all()
    assert (dataset.ages[~from_csv] == train["age"][~from_csv].to_numpy()).all()


def test_label_csv_rows(tiny):
    path, labels = write_label_csv(tiny)
    table = D.read_label_csv(path, "extra3")
    assert table["image_path"].tolist() == [str((tiny / "eval" / p).resolve()) for p in labels["path"]]
    assert D.encode_class(table["mask"], table["gender"], D.age_band(table["age"])).tolist() == labels["class"].tolist()
    assert set(table["age"]) <= set(D.BAND_AGES)
    bands = D.decode_class(labels["class"].to_numpy())[2]
    for threshold in (31, 45, 58, 100):  # every age_threshold train.py takes keeps each row's band
        assert (D.add_labels(table, threshold)["age_band"].to_numpy() == bands).all(), threshold
    assert table["id"].str.startswith("extra3:").all() and (table["source"] == "extra3").all()
    aged, aged_labels = write_label_csv(tiny, with_age=True)
    aged_table = D.read_label_csv(aged, "extra0")
    assert aged_table["age"].tolist() == aged_labels["age"].tolist() and aged_table["age_known"].all()


def test_label_csv_rows_with_a_blank_age_know_only_their_band(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    (tmp_path / "labels.csv").write_text("path,class,age\na.png,4,33\nb.png,5,\n")  # male, masked: 30-59, 60+
    table = D.read_label_csv(tmp_path / "labels.csv", "extra0")
    assert table["age"].tolist() == [33, D.BAND_AGES[2]] and table["age_known"].tolist() == [True, False]
    assert D.age_known(table).tolist() == [True, False]


def test_label_csv_of_every_class_without_ages_keeps_each_band_under_every_threshold(tmp_path):
    for label in range(D.NUM_CLASSES):
        Image.new("RGB", (2, 2)).save(tmp_path / f"{label}.png")
    pd.DataFrame({"path": [f"{c}.png" for c in range(D.NUM_CLASSES)], "class": range(D.NUM_CLASSES)}).to_csv(
        tmp_path / "labels.csv", index=False)
    table = D.read_label_csv(tmp_path / "labels.csv", "extra0")
    assert not table["age_known"].any()
    for threshold in range(31, 101):  # every age_threshold train.py takes
        labelled = D.add_labels(table, threshold)
        assert labelled["label"].tolist() == list(range(D.NUM_CLASSES)), threshold
        assert labelled["true_label"].tolist() == list(range(D.NUM_CLASSES)), threshold


def write_soft_label_csv(root, probs):
    names = [f"{k}.png" for k in range(len(probs))]
    for name in names:
        Image.new("RGB", (4, 4)).save(root / name)
    table = pd.DataFrame({"path": names, "class": np.asarray(probs).argmax(1)})
    table[D.PROB_COLUMNS] = probs
    table.to_csv(root / "soft.csv", index=False)
    return root / "soft.csv", table


def test_label_csv_with_class_probabilities_gives_the_dataset_soft_targets(thirty, tmp_path):
    probs = np.random.default_rng(0).dirichlet(np.ones(D.NUM_CLASSES), size=3).astype(np.float32)
    label_csv, _ = write_soft_label_csv(tmp_path, probs)
    table = D.read_label_csv(label_csv, "extra0")
    np.testing.assert_allclose(table[D.PROB_COLUMNS].to_numpy(), probs, rtol=1e-6)
    cfg = make_cfg(thirty / "train", tmp_path, extra_data=[str(label_csv)], cache_dir="")
    images = D.load_training_images(cfg)
    train, _ = D.split_train_valid(images, None)
    dataset = D.make_dataset(train, cfg, D.build_transform("plain", RESIZE, MEAN, STD)[0])
    from_csv = (train["source"] == "extra0").to_numpy()
    np.testing.assert_allclose(dataset.soft[from_csv], probs, rtol=1e-6)
    assert np.isnan(dataset.soft[~from_csv]).all()
    first_soft = int(np.flatnonzero(from_csv)[0])
    np.testing.assert_array_equal(dataset[first_soft][3], dataset.soft[first_soft])
    assert np.isnan(dataset[0][3]).all() and not from_csv[0]


@pytest.mark.parametrize("change, message", [
    (lambda t: t.drop(columns="p17"), r"soft targets need all of p0..p17; missing \['p17'\]"),
    (lambda t: t.assign(p0=t["p0"] + 0.5), r"1 row\(s\) whose p0..p17 do not sum to 1, e.g. path \['0.png'\]"),
    (lambda t: t.assign(p3=-t["p3"]), r"1 row\(s\) with p0..p17 not numbers in \[0, 1\], e.g. path \['0.png'\]"),
    (lambda t: t.assign(p5="x"), r"1 row\(s\) with p0..p17 not numbers in \[0, 1\], e.g. path \['0.png'\]"),
])
def test_label_csv_with_bad_class_probabilities_names_the_file(tmp_path, change, message):
    label_csv, table = write_soft_label_csv(tmp_path, np.full((1, D.NUM_CLASSES), 1 / D.NUM_CLASSES))
    change(table).to_csv(label_csv, index=False)
    with pytest.raises(D.DataError, match="soft.csv: " + message):
        D.read_label_csv(label_csv, "extra0")


def test_label_csv_with_an_age_outside_its_class_band_is_refused(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "labels.csv").write_text("path,class,age\na.png,0,45\n")  # class 0 is under 30
    with pytest.raises(D.DataError, match=r"labels.csv: the age of \['a.png'\] is not in the age band of its class"):
        D.read_label_csv(tmp_path / "labels.csv", "extra0")


@pytest.mark.parametrize("age", ["290", "\u2460"])
def test_label_csv_with_an_impossible_age_is_refused(tmp_path, age):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "labels.csv").write_text(f"path,class,age\na.png,2,{age}\n", encoding="utf-8")
    with pytest.raises(D.DataError, match=rf"labels.csv: age value\(s\) \['{age}'\] are not whole years from 1 to 120"):
        D.read_label_csv(tmp_path / "labels.csv", "extra0")


def test_an_empty_csv_names_the_file(tmp_path):
    (tmp_path / "labels.csv").write_text("")
    with pytest.raises(D.DataError, match="labels.csv: cannot parse CSV"):
        D.read_label_csv(tmp_path / "labels.csv", "extra0")


@pytest.mark.parametrize("bad_class", ["18", "x", "-1", "3.7"])
def test_label_csv_with_a_bad_class_names_the_file(tmp_path, bad_class):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "pseudo.csv").write_text(f"path,class\na.png,{bad_class}\n")
    with pytest.raises(D.DataError, match=rf"pseudo.csv: class value\(s\) \['{bad_class}'\] are not integers 0..17"):
        D.read_label_csv(tmp_path / "pseudo.csv", "extra0")


def test_label_csv_with_a_missing_image_names_the_file(tmp_path):
    (tmp_path / "pseudo.csv").write_text("path,class\nnothere.png,3\n")
    with pytest.raises(D.DataError) as exc:
        D.read_label_csv(tmp_path / "pseudo.csv", "extra0")
    assert "pseudo.csv" in str(exc.value) and "nothere.png" in str(exc.value)


def test_empty_train_csv_and_info_csv_are_errors_naming_the_file(fresh):
    (fresh / "train" / "train.csv").write_text("id,gender,race,age,path\n")
    with pytest.raises(D.DataError, match="train.csv: no people"):
        D.read_train_images(fresh / "train")
    (fresh / "eval" / "info.csv").write_text("ImageID,ans\n")
    with pytest.raises(D.DataError, match="info.csv: no images listed"):
        D.read_eval_images(fresh / "eval")


def test_a_row_with_a_field_too_many_is_an_error_naming_its_line(fresh):
    """pandas would read it as a shifted row and blame the next line's age."""
    lines = (fresh / "train" / "train.csv").read_text().splitlines()
    lines[1] += ",extra"  # the first row: pandas takes a row one field wider as an index column
    (fresh / "train" / "train.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(D.DataError, match="train.csv: line 2: 6 fields, but the header has 5"):
        D.read_train_images(fresh / "train")


def test_a_line_of_spaces_is_skipped_like_a_blank_line(fresh):
    path = fresh / "train" / "train.csv"
    path.write_text(path.read_text() + "   \n")
    assert D.read_train_images(fresh / "train")["id"].nunique() == 3


def test_a_worker_message_keeps_its_own_text_whole():
    inner = "a.jpg: unreadable (DataError: nested)\nsecond line"
    wrapped = (f"Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               f'  File "dataset.py", line 1, in decode\n    raise DataError(...)\ndataset.DataError: {inner}\n')
    assert str(D.DataError(wrapped)) == inner


def test_folders_and_eval_images_no_csv_lists_are_named_in_a_warning(fresh, caplog):
    shutil.copytree(person_folder(fresh), fresh / "train" / "images" / "000099_male_Asian_40")
    first = sorted((fresh / "eval" / "images").iterdir())[0]
    shutil.copy(first, first.with_name("unlisted.jpg"))
    with caplog.at_level(logging.WARNING, logger="mask"):
        assert D.read_train_images(fresh / "train")["id"].nunique() == 3
        assert "unlisted.jpg" not in D.read_eval_images(fresh / "eval")["ImageID"].tolist()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("1 person folder(s) not listed in" in w and "000099_male_Asian_40" in w for w in warnings)
    assert any("1 image(s) not listed in" in w and "info.csv" in w and "unlisted.jpg" in w for w in warnings)


def test_an_oversized_image_is_an_error_naming_the_file(fresh, monkeypatch):
    path = person_folder(fresh) / "normal.jpg"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 24x32 is over 2x this: Pillow's decompression-bomb error
    with pytest.raises(D.DataError, match=f"{path}: unreadable, truncated or oversized image"):
        D.read_rgb(path)


def test_a_decode_error_raised_in_a_loader_worker_keeps_only_its_message(fresh, tmp_path):
    bad = person_folder(fresh) / "mask1.jpg"
    bad.write_bytes(b"not a jpeg")
    table = D.read_train_images(fresh / "train")
    dataset = D.make_dataset(table, make_cfg(fresh / "train", tmp_path, cache_dir=""), D.build_transform(
        "plain", RESIZE, MEAN, STD)[0])
    loader = torch.utils.data.DataLoader(dataset, batch_size=len(dataset), num_workers=1)
    with pytest.raises(D.DataError) as exc:
        next(iter(loader))
    assert str(exc.value).startswith(f"{bad}: unreadable") and "Traceback" not in str(exc.value)


# ---------------------------------------------------------------------------------------------
# 4. Splits by person
def test_five_fold_splits_are_by_person(thirty, tmp_path):
    images = D.load_training_images(make_cfg(thirty / "train", tmp_path, val_ratio=0.2))
    assert D.num_folds(0.2) == 5
    folds_per_person = images.groupby("id")["fold"].nunique()
    assert (folds_per_person == 1).all()  # every person in exactly one fold
    people = images.drop_duplicates("id")
    assert sorted(people["fold"].unique()) == [0, 1, 2, 3, 4]
    everyone = set(people["id"])
    for fold in range(5):
        train, valid = D.split_train_valid(images, fold)
        assert not set(train["id"]) & set(valid["id"])
        assert set(train["id"]) | set(valid["id"]) == everyone
        assert set(valid["id"]) == set(people["id"][people["fold"] == fold])
        assert len(train) + len(valid) == len(images)
        in_fold = people[people["fold"] == fold]
        # stratified on gender x age band: 30 people = 5 of each of the 6 groups -> 1 of each per fold
        assert 4 <= len(in_fold) <= 8
        assert set(in_fold["gender"]) == {0, 1} and set(in_fold["age_band"]) == {0, 1, 2}


def test_assign_folds_on_a_plain_table():
    rng = np.random.default_rng(0)
    people = pd.DataFrame({"id": [f"p{i}" for i in range(40)], "gender": rng.integers(0, 2, 40),
                           "age": rng.integers(18, 80, 40)})
    images = people.loc[people.index.repeat(7)].reset_index(drop=True)
    folds = D.assign_folds(images, 5, seed=1)
    assert len(folds) == len(images)
    per_person = folds.groupby(images["id"]).nunique()
    assert (per_person == 1).all()
    counts = folds.groupby(images["id"]).first().value_counts()
    assert sorted(counts.index) == [0, 1, 2, 3, 4] and counts.min() >= 4
    few = images[images["id"].isin(["p0", "p1", "p2", "p3"])]  # 4 people cannot fill 5 folds
    with pytest.raises(D.DataError, match=r"4 training people do not fill 5 validation folds.*--val_ratio 0"):
        D.assign_folds(few, 5, seed=1)
    five = images[images["id"].isin(["p0", "p1", "p2", "p3", "p4"])]
    filled = []
    for seed in range(40):  # as many people as folds: the strata sometimes leave a fold empty, which is refused
        try:
            filled.append(D.assign_folds(five, 5, seed=seed).nunique())
        except D.DataError as e:
            assert "5 training people do not fill 5 validation folds" in str(e)
    assert set(filled) == {5} and 0 < len(filled) < 40


def test_folds_are_stratified_on_gender_and_the_competition_age_bands(monkeypatch):
    ages = [25, 29, 30, 45, 57, 58, 59, 60, 61, 75]
    people = pd.DataFrame({"id": [f"p{i}" for i in range(20)], "gender": [0] * 10 + [1] * 10, "age": ages * 2})
    images = people.loc[people.index.repeat(2)].reset_index(drop=True)
    strata = []

    class Spy(D.StratifiedGroupKFold):
        def split(self, X, y=None, groups=None):
            strata.append(np.asarray(y))
            return super().split(X, y, groups)

    monkeypatch.setattr(D, "StratifiedGroupKFold", Spy)
    D.assign_folds(images, 2, seed=0)
    band = [0, 0, 1, 1, 1, 1, 1, 2, 2, 2]  # 58 and 59 are 30-59 whatever age_threshold trains
    assert strata[0].tolist() == np.repeat([*band, *(3 + b for b in band)], 2).tolist()
    monkeypatch.undo()
    # 59- and 60-year-olds of one gender, in their own strata, fill two folds evenly
    people = pd.DataFrame({"id": [f"q{i}" for i in range(8)], "gender": 0, "age": [59] * 4 + [65] * 4})
    for seed in range(5):
        folds = D.assign_folds(people, 2, seed=seed)
        assert (folds[people["age"] == 59].value_counts() == 2).all(), seed


def test_same_seed_same_folds_other_seed_may_differ(thirty, tmp_path):
    def folds(seed):
        images = D.load_training_images(make_cfg(thirty / "train", tmp_path, seed=seed))
        return images.drop_duplicates("id").set_index("id")["fold"].to_dict()
    first = folds(7)
    assert folds(7) == first
    assert any(folds(seed) != first for seed in (8, 9, 10))


def test_val_ratio_and_number_of_folds(fresh, tmp_path):
    assert D.num_folds(0.2) == 5 and D.num_folds(0.34) == 3 and D.num_folds(0.5) == 2
    for bad in (0, 0.9, 1, -0.1):
        with pytest.raises(ValueError):
            D.num_folds(bad)
    images = D.load_training_images(make_cfg(fresh / "train", tmp_path, val_ratio=0))
    assert (images["fold"] == -1).all()
    train, valid = D.split_train_valid(images, None)
    assert valid is None and len(train) == len(images)


# ---------------------------------------------------------------------------------------------
# 5. Augmentation, batch mixing, sampling weights
def uint8_image(seed=0, size=RESIZE):
    return torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def augment(preset, x):
    """One image through a preset: its per-image (worker) part, then its batch (device) part."""
    sample, batch_transform = D.build_transform(preset, RESIZE, MEAN, STD)
    return batch_transform(sample(x)[None])[0]


@pytest.mark.parametrize("preset", ["plain", "light", "strong"])
def test_workers_hand_over_uint8_images(preset):
    torch.manual_seed(0)
    sample, _ = D.build_transform(preset, RESIZE, MEAN, STD)
    out = sample(uint8_image(size=(40, 30) if preset == "strong" else RESIZE))
    assert out.dtype == torch.uint8 and tuple(out.shape) == (3, *RESIZE)


def test_batch_jitter_differs_per_image():
    x = uint8_image(3)[None].repeat(4, 1, 1, 1)
    _, batch_transform = D.build_transform("light", RESIZE, MEAN, STD)
    torch.manual_seed(0)
    out = batch_transform(x)
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[2], out[3])


@pytest.mark.parametrize("preset", ["plain", "light", "strong"])
def test_presets_return_normalized_float_tensors(preset):
    torch.manual_seed(0)
    out = augment(preset, uint8_image())
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert tuple(out.shape) == (3, *RESIZE)
    assert torch.isfinite(out).all()


def test_strong_preset_resizes_to_the_configured_size():
    torch.manual_seed(0)
    out = augment("strong", uint8_image(size=(40, 30)))
    assert tuple(out.shape) == (3, *RESIZE)


def test_plain_is_deterministic_normalization():
    x = uint8_image(1)
    def transform(image):
        return augment("plain", image)
    expected = (x.float() / 255 - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    torch.testing.assert_close(transform(x), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(transform(x), transform(x))


def test_random_presets_change_the_image():
    x = uint8_image(2)
    plain = augment("plain", x)
    for preset in ("light", "strong"):
        torch.manual_seed(0)
        outs = [augment(preset, x) for _ in range(8)]
        assert any(not torch.allclose(o, plain) for o in outs), preset
        torch.manual_seed(0)
        assert all(torch.equal(o, augment(preset, x)) for o in outs), preset  # repeatable under a seed


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match="medium"):
        D.build_transform("medium", RESIZE, MEAN, STD)


def batch(n=6, h=8, w=10):
    """Images whose every pixel differs from every other image's."""
    base = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1) * 100
    return base + torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(0))


def test_mixup_is_a_convex_blend():
    x = batch()
    torch.manual_seed(1)
    mixed, perm, lam = D.mix_batch(x, "mixup", 1.0)
    assert sorted(perm.tolist()) == list(range(len(x)))
    assert 0.0 <= lam <= 1.0
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x[perm])
    lo, hi = torch.minimum(x, x[perm]), torch.maximum(x, x[perm])
    assert ((mixed >= lo - 1e-4) & (mixed <= hi + 1e-4)).all()


@pytest.mark.parametrize("w", [10, 9])
def test_vertical_cutmix_halves(w):
    x = batch(w=w)
    torch.manual_seed(2)
    mixed, perm, lam = D.mix_batch(x, "vertical_cutmix", 1.0)
    half = w // 2
    assert torch.equal(mixed[..., :half], x[..., :half])
    assert torch.equal(mixed[..., half:], x[perm][..., half:])
    assert lam == pytest.approx(half / w)
    if w % 2 == 0:
        assert lam == 0.5
    assert torch.equal(x, batch(w=w))  # the input batch is not modified


def test_cutmix_lam_matches_the_pasted_area():
    x = batch(n=8, h=16, w=20)
    checked = 0
    for seed in range(6):
        torch.manual_seed(seed)
        mixed, perm, lam = D.mix_batch(x, "cutmix", 1.0)
        pasted = (mixed != x).any(dim=1)  # N x H x W
        for i in range(len(x)):
            if perm[i] == i:
                assert not pasted[i].any()
                continue
            assert pasted[i].float().mean().item() == pytest.approx(1 - lam, abs=1e-6)
            assert torch.equal(mixed[i][:, pasted[i]], x[perm[i]][:, pasted[i]])
            assert torch.equal(mixed[i][:, ~pasted[i]], x[i][:, ~pasted[i]])
            checked += 1
    assert checked > 0


def test_unknown_mix_raises():
    with pytest.raises(ValueError, match="shuffle"):
        D.mix_batch(batch(), "shuffle", 1.0)


def test_class_balanced_weights_equal_total_per_class():
    labels = np.array([0, 0, 0, 0, 5, 5, 17, 9, 9, 9])
    weights = D.class_balanced_weights(labels)
    assert weights.dtype == torch.double and len(weights) == len(labels)
    totals = {c: weights[torch.as_tensor(labels == c)].sum().item() for c in np.unique(labels)}
    assert totals == pytest.approx({0: 1.0, 5: 1.0, 17: 1.0, 9: 1.0})
    assert weights[0] < weights[6]  # a rare class weighs more per image


# ---------------------------------------------------------------------------------------------
# 6. Cache
def test_build_cache_writes_and_reuses_the_array(tiny, tmp_path, monkeypatch):
    paths = D.read_train_images(tiny / "train")["image_path"].tolist()[:10]
    cache_dir = tmp_path / "cache"
    array_path, errors = D.build_cache(paths, RESIZE, [D.FULL_IMAGE] * len(paths), cache_dir)
    assert Path(array_path).parent == cache_dir and Path(array_path).suffix == ".npy" and Path(array_path).is_file()
    assert errors == [""] * len(paths)
    assert not list(cache_dir.glob("*.tmp*"))  # no temporary file left behind
    array = np.load(array_path)
    assert array.dtype == np.uint8 and array.shape == (len(paths), 3, *RESIZE)
    for i, p in enumerate(paths):
        assert np.array_equal(array[i], D.decode_image(p, RESIZE).transpose(2, 0, 1))
    mtime = Path(array_path).stat().st_mtime_ns

    def no_decoding(*args, **kwargs):
        raise AssertionError("the cache was rebuilt")
    monkeypatch.setattr(D, "decode_image", no_decoding)
    again, errors_again = D.build_cache(paths, RESIZE, [D.FULL_IMAGE] * len(paths), cache_dir)
    assert again == array_path and errors_again == errors
    assert Path(again).stat().st_mtime_ns == mtime


def test_a_cache_array_without_its_json_is_rebuilt(tiny, tmp_path):
    paths = D.read_train_images(tiny / "train")["image_path"].tolist()[:3]
    array_path, _ = D.build_cache(paths, RESIZE, [D.FULL_IMAGE] * len(paths), tmp_path / "cache")
    Path(array_path).with_suffix(".json").unlink()  # e.g. removed by hand, or a cache copied without it
    again, errors = D.build_cache(paths, RESIZE, [D.FULL_IMAGE] * len(paths), tmp_path / "cache")
    assert again == array_path and errors == [""] * len(paths) and Path(array_path).with_suffix(".json").is_file()
    for i, p in enumerate(paths):
        assert np.array_equal(np.load(again)[i], D.decode_image(p, RESIZE).transpose(2, 0, 1))


def test_an_interrupted_cache_build_leaves_nothing_behind(tiny, tmp_path, monkeypatch):
    """Ctrl-C mid-build removes the half-written array (gigabytes at full size), and the next
    build starts afresh and completes."""
    paths = D.read_train_images(tiny / "train")["image_path"].tolist()[:10]
    cache_dir = tmp_path / "cache"
    real_decode, calls = D.decode_image, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_decode(*args)

    monkeypatch.setattr(D, "decode_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        D.build_cache(paths, RESIZE, [D.FULL_IMAGE] * len(paths), cache_dir)
    assert cache_dir.is_dir() and not list(cache_dir.iterdir())
    monkeypatch.undo()
    array_path, errors = D.build_cache(paths, RESIZE, [D.FULL_IMAGE] * len(paths), cache_dir)
    assert np.load(array_path).shape[0] == len(paths) and errors == [""] * len(paths)
    assert sorted(p.suffix for p in cache_dir.iterdir()) == [".json", ".npy"]


def test_cache_key_changes_with_size_crop_files_and_order(tiny, tmp_path):
    paths = D.read_train_images(tiny / "train")["image_path"].tolist()[:4]
    full = [D.FULL_IMAGE] * len(paths)
    key = D.cache_key(paths, RESIZE, full)
    assert D.cache_key(list(paths), list(RESIZE), [list(b) for b in full]) == key
    assert D.cache_key(paths, [20, 15], full) != key
    assert D.cache_key(paths, RESIZE, [D.center_box((0.8, 0.8))] * len(paths)) != key
    assert D.cache_key(paths, RESIZE, full[:-1] + [(0.0, 0.0, 1.0, 0.9)]) != key  # one image's box
    assert D.cache_key(paths[::-1], RESIZE, full) != key
    assert D.cache_key(paths[:3], RESIZE, full) != key
    a, _ = D.build_cache(paths, RESIZE, [D.FULL_IMAGE] * len(paths), tmp_path / "cache")
    b, _ = D.build_cache(paths, [20, 15], [D.FULL_IMAGE] * len(paths), tmp_path / "cache")
    assert a != b and np.load(b).shape == (4, 3, 20, 15)


def test_cache_notices_a_changed_file(fresh, tmp_path):
    paths = D.read_train_images(fresh / "train")["image_path"].tolist()[:3]
    first, _ = D.build_cache(paths, RESIZE, [D.FULL_IMAGE] * len(paths), tmp_path / "cache")
    Image.new("RGB", SIZE, (255, 0, 0)).save(paths[0])
    second, _ = D.build_cache(paths, RESIZE, [D.FULL_IMAGE] * len(paths), tmp_path / "cache")
    assert second != first
    red = np.array([255, 0, 0])[:, None, None]
    assert np.abs(np.load(second)[0].astype(int) - red).max() <= 3  # now red (up to JPEG error)
    assert np.abs(np.load(first)[0].astype(int) - red).max() > 50  # the old cache is not reused


def test_cache_key_notices_a_new_modification_time_or_a_new_size_alone(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(b"1234")
    os.utime(path, ns=(10**18, 10**18))
    key = D.cache_key([str(path)], RESIZE, [D.FULL_IMAGE])
    os.utime(path, ns=(10**18, 10**18 + 10**9))  # touched: same bytes, same size
    assert D.cache_key([str(path)], RESIZE, [D.FULL_IMAGE]) != key
    path.write_bytes(b"123456")  # replaced, its time set back: only the size tells
    os.utime(path, ns=(10**18, 10**18))
    assert D.cache_key([str(path)], RESIZE, [D.FULL_IMAGE]) != key


def test_face_dataset_same_with_and_without_cache(tiny, tmp_path, monkeypatch):
    table = D.add_labels(D.read_train_images(tiny / "train"), 60).iloc[::3].reset_index(drop=True)
    transform = D.build_transform("plain", RESIZE, MEAN, STD)[0]
    for crop in ([1.0, 1.0], [0.8, 0.7]):
        cached = D.make_dataset(table, make_cfg(tiny / "train", tmp_path, center_crop=crop), transform)
        direct = D.make_dataset(table, make_cfg(tiny / "train", tmp_path, center_crop=crop, cache_dir=""), transform)
        assert cached.cache_file is not None and direct.cache_file is None
        cpu, cuda = torch.device("cpu"), torch.device("cuda")
        workers = {"num_workers": 2, "cache_workers": 0}
        assert (cached.loader_workers(workers, cpu), direct.loader_workers(workers, cpu)) == (0, 2)  # workers only to decode
        assert cached.loader_workers({**workers, "cache_workers": 3}, cpu) == 3
        by_device = {**workers, "cache_workers": -1}  # the default: the main process on a CPU, workers on a GPU
        assert (cached.loader_workers(by_device, cpu), direct.loader_workers(by_device, cuda)) == (0, 2)
        for cores, readers in [(16, 4), (6, 3), (1, 0)]:  # 4, at most half the cores
            monkeypatch.setattr(D, "usable_cores", lambda: cores)
            assert cached.loader_workers(by_device, cuda) == readers
        with pytest.raises(SystemExit, match="--cache_workers must be -1"):
            cached.loader_workers({**workers, "cache_workers": -2}, cpu)
        assert len(cached) == len(direct) == len(table)
        for i in range(len(table)):
            (xc, yc, ac, sc), (xd, yd, ad, sd) = cached[i], direct[i]
            assert torch.equal(xc, xd) and (yc, ac) == (yd, ad)
            assert yc == table["label"][i] and ac == table["age"][i]
            assert sc.shape == sd.shape == (D.NUM_CLASSES,) and np.isnan(sc).all() and np.isnan(sd).all()
            assert xc.shape == (3, *RESIZE) and xc.dtype == torch.uint8  # workers hand over uint8
        order = [4, 0, 2, 2, 1]  # a shuffled batch (one read of the cache array) = item by item
        for (xb, yb, ab, _), (xd, yd, ad, _) in zip(cached.__getitems__(order), [direct[i] for i in order]):
            assert torch.equal(xb, xd) and (yb, ab) == (yd, ad)
        batch = next(iter(torch.utils.data.DataLoader(cached, batch_size=len(table))))
        assert torch.equal(batch[0], torch.stack([direct[i][0] for i in range(len(table))]))
        assert batch[2].dtype == torch.float32


def test_center_crop_keeps_the_middle(tmp_path):
    img = np.zeros((40, 30, 3), np.uint8)
    img[10:30, 7:22] = 200  # the central half (rows 10..29, columns 7.5..22.5)
    Image.fromarray(img).save(tmp_path / "a.png")
    out = D.decode_image(tmp_path / "a.png", (20, 15), D.center_box((0.5, 0.5)))
    assert out.shape == (20, 15, 3)
    assert out[2:-2, 2:-2].min() > 150  # only the bright middle is left
    full = D.decode_image(tmp_path / "a.png", (20, 15))
    assert full[0, 0].max() == 0


def test_make_dataset_of_an_empty_table(tiny, tmp_path):
    table = D.add_labels(D.read_train_images(tiny / "train"), 60).iloc[:0]
    ds = D.make_dataset(table, make_cfg(tiny / "train", tmp_path), D.build_transform("plain", RESIZE, MEAN, STD)[0])
    assert len(ds) == 0


# ---------------------------------------------------------------------------------------------
# 7. Bad input: a DataError naming the file
def error_of(func, *args):
    with pytest.raises(D.DataError) as exc:
        func(*args)
    return str(exc.value)


def test_missing_train_csv(fresh):
    (fresh / "train" / "train.csv").unlink()
    message = error_of(D.read_train_images, fresh / "train")
    assert str(fresh / "train" / "train.csv") in message and "not found" in message


def test_the_dataset_root_or_a_missing_eval_folder_is_named_with_the_fix(fresh):
    assert error_of(D.read_train_images, fresh) == (f"{fresh}: no train.csv here; the training folder is "
                                                     f"{fresh / 'train'}: --data_dir {fresh / 'train'}")
    assert error_of(D.read_eval_images, fresh / "nope").startswith(f"{fresh / 'nope'}: no such folder")


def test_missing_info_csv(fresh):
    (fresh / "eval" / "info.csv").unlink()
    message = error_of(D.read_eval_images, fresh / "eval")
    assert str(fresh / "eval" / "info.csv") in message


def test_missing_column(fresh):
    people_table(fresh).drop(columns="age").to_csv(fresh / "train" / "train.csv", index=False)
    message = error_of(D.read_train_images, fresh / "train")
    assert "train.csv" in message and "'age'" in message


@pytest.mark.parametrize("column, value", [("age", "abc"), ("age", "31.5"), ("age", ""), ("gender", "x"),
                                           ("age", "290"), ("age", "0"), ("age", "\u00b2")])  # a typo, a superscript 2
def test_bad_value_in_train_csv(fresh, column, value):
    table = people_table(fresh)
    table.loc[1, column] = value
    table.to_csv(fresh / "train" / "train.csv", index=False)
    message = error_of(D.read_train_images, fresh / "train")
    assert str(fresh / "train" / "train.csv") in message and "line 3" in message and f"'{value}'" in message


def test_a_bad_row_after_blank_lines_is_named_by_its_line_in_the_file(fresh):
    """pandas skips empty and whitespace-only lines; the message still counts them."""
    path = fresh / "train" / "train.csv"
    header, first, second, *rest = path.read_text().splitlines()
    second = second.replace(",female,", ",x,").replace(",male,", ",x,")
    path.write_text("\n".join([header, first, "", "   ", second, *rest]) + "\n")
    message = error_of(D.read_train_images, fresh / "train")
    assert "line 5: gender 'x'" in message


def test_duplicate_ids(fresh):
    ids = people_table(fresh)["id"].tolist()
    rewrite_train_csv(fresh, id=[ids[0], ids[1], ids[0]])
    message = error_of(D.read_train_images, fresh / "train")
    assert "train.csv" in message and "duplicate" in message and ids[0] in message


def test_two_rows_reading_one_folder_are_an_error(fresh):
    paths = people_table(fresh)["path"].tolist()
    rewrite_train_csv(fresh, path=[paths[0], paths[1], paths[0]])
    message = error_of(D.read_train_images, fresh / "train")
    assert "train.csv" in message and "duplicate path" in message and paths[0] in message


def test_one_folder_written_two_ways_is_a_duplicate_path(fresh):
    """'a/' and 'a' read one folder: its images would land in two folds."""
    paths = people_table(fresh)["path"].tolist()
    rewrite_train_csv(fresh, path=[paths[0], paths[1], paths[0] + "/"])
    message = error_of(D.read_train_images, fresh / "train")
    assert "train.csv" in message and "duplicate path" in message and paths[0] in message


@pytest.mark.parametrize("column", ["id", "path"])
def test_an_empty_id_or_path_names_its_line(fresh, column):
    table = people_table(fresh)
    table.loc[1, column] = " "
    table.to_csv(fresh / "train" / "train.csv", index=False)
    assert "train.csv: line 3: empty id or path" in error_of(D.read_train_images, fresh / "train")


def test_a_link_to_nothing_in_a_person_folder_is_named(fresh):
    folder = fresh / "train" / "images" / people_table(fresh)["path"][0]
    image = next(folder.glob("mask1.*"))
    image.unlink()
    image.symlink_to(fresh / "nowhere.jpg")
    assert f"{image}: not a file (a folder, or a link to nothing)" in error_of(D.read_train_images, fresh / "train")


def test_a_folder_name_that_disagrees_with_its_row_is_logged(fresh, caplog):
    table = people_table(fresh)
    table.loc[1, "age"] = str(int(table.loc[1, "age"]) + 40)  # a fix applied to train.csv but not to the folder
    table.to_csv(fresh / "train" / "train.csv", index=False)
    with caplog.at_level(logging.WARNING, logger="mask"):
        images = D.read_train_images(fresh / "train")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "train.csv: 1 row(s)" in warnings[0] and "line 3: " in warnings[0]
    assert table.loc[1, "path"] in warnings[0]
    assert (images.loc[images["id"] == table.loc[1, "id"], "age"] == int(table.loc[1, "age"])).all()  # columns win


def test_a_folder_name_not_in_the_competition_form_is_logged(fresh, caplog):
    table = people_table(fresh)
    (fresh / "train" / "images" / table.loc[0, "path"]).rename(fresh / "train" / "images" / "person2")
    table.loc[0, "path"] = "person2"
    table.to_csv(fresh / "train" / "train.csv", index=False)
    with caplog.at_level(logging.WARNING, logger="mask"):
        images = D.read_train_images(fresh / "train")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "is not {id}_{gender}_{race}_{age}" in warnings[0] and "vs folder person2" in warnings[0]
    assert (images["id"] == table.loc[0, "id"]).sum() == 7  # read all the same, labelled by its row


def test_extra_data_that_repeats_training_images_is_refused(fresh, tmp_path):
    cfg = make_cfg(fresh / "train", tmp_path, extra_data=[str(fresh / "train")], val_ratio=0)
    message = error_of(D.load_training_images, cfg)
    assert str(fresh / "train") in message and "21 image(s) already read from --data_dir" in message
    label_csv = tmp_path / "labels.csv"
    pd.DataFrame({"path": [str(person_folder(fresh) / "mask1.jpg")], "class": [0]}).to_csv(label_csv, index=False)
    cfg["extra_data"] = [str(label_csv)]
    assert "labels.csv: 1 image(s) already read" in error_of(D.load_training_images, cfg)
    # a copy of the training folder elsewhere: other paths, the same images (validation would leak)
    shutil.copytree(fresh / "train", tmp_path / "copy" / "train")
    cfg["extra_data"] = [str(tmp_path / "copy" / "train")]
    message = error_of(D.load_training_images, cfg)
    assert "21 image(s) already read from --data_dir" in message and f"(a copy of {fresh / 'train'}" in message


def test_an_image_in_two_extra_label_csvs_or_twice_in_one_is_refused(fresh, tmp_path):
    image = next((fresh / "eval" / "images").iterdir())
    first, second, twice = (tmp_path / name for name in ("first.csv", "second.csv", "twice.csv"))
    pd.DataFrame({"path": [str(image)], "class": [0]}).to_csv(first, index=False)
    pd.DataFrame({"path": [str(image)], "class": [0]}).to_csv(second, index=False)
    pd.DataFrame({"path": [str(image), str(image)], "class": [0, 0]}).to_csv(twice, index=False)
    cfg = make_cfg(fresh / "train", tmp_path, val_ratio=0)
    for extra, named in (([first, second], second), ([first, first], first), ([twice], twice)):
        cfg["extra_data"] = [str(p) for p in extra]
        message = error_of(D.load_training_images, cfg)
        assert message.startswith(f"{named}: 1 image(s) already read from --data_dir or an earlier --extra_data")
        assert str(image.resolve()) in message
    cfg["extra_data"] = [str(first)]
    assert len(D.load_training_images(cfg)) == 3 * 7 + 1


def test_rotated_and_16_bit_images_are_decoded_as_they_look(tmp_path):
    upright = np.zeros((40, 20, 3), np.uint8)
    upright[:10] = 255  # a white band at the top of a portrait
    exif = Image.Exif()
    exif[D.EXIF_ORIENTATION] = 6  # stored turned 90 degrees, to be turned back when shown
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "turned.jpg", exif=exif, quality=95)
    decoded = np.asarray(D.read_rgb(tmp_path / "turned.jpg")).astype(int)
    assert decoded.shape == (40, 20, 3)
    assert decoded[:8].mean() > 200 and decoded[12:].mean() < 50
    grey = (np.arange(20 * 10).reshape(20, 10) * 300).astype(np.uint16)  # 16-bit grey ramp, 0..59700
    Image.fromarray(grey).save(tmp_path / "deep.png")
    decoded = np.asarray(D.read_rgb(tmp_path / "deep.png"))
    np.testing.assert_array_equal(decoded[..., 0], (grey >> 8).astype(np.uint8))


def test_person_folder_missing(fresh):
    folder = person_folder(fresh, 1)
    shutil.rmtree(folder)
    assert str(folder) in error_of(D.read_train_images, fresh / "train")


def test_missing_image(fresh):
    folder = person_folder(fresh)
    (folder / "normal.jpg").unlink()
    message = error_of(D.read_train_images, fresh / "train")
    assert str(folder) in message and "normal" in message


def test_unexpected_image(fresh):
    folder = person_folder(fresh)
    shutil.copy(folder / "mask1.jpg", folder / "mask6.jpg")
    assert str(folder / "mask6.jpg") in error_of(D.read_train_images, fresh / "train")


def test_two_files_for_one_stem(fresh):
    folder = person_folder(fresh)
    Image.open(folder / "mask1.jpg").save(folder / "mask1.png")
    message = error_of(D.read_train_images, fresh / "train")
    assert str(folder) in message and "mask1.jpg" in message and "mask1.png" in message


def test_hidden_files_are_ignored(fresh):
    folder = person_folder(fresh)
    (folder / "._mask1.jpg").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    (folder / ".DS_Store").write_bytes(b"junk")
    images = D.read_train_images(fresh / "train")
    assert len(images) == 21 and not images["image_path"].str.contains("/\\.").any()


def test_info_csv_row_without_image(fresh):
    info = pd.read_csv(fresh / "eval" / "info.csv", dtype=str)
    missing = info["ImageID"][2]
    (fresh / "eval" / "images" / missing).unlink()
    message = error_of(D.read_eval_images, fresh / "eval")
    assert str(fresh / "eval" / "info.csv") in message and missing in message


def truncate(path):
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:len(data) // 2])


def test_a_missing_image_is_named_as_missing_with_where_a_relative_path_was_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert error_of(D.read_rgb, tmp_path / "gone.jpg") == f"{tmp_path / 'gone.jpg'}: image not found"
    assert error_of(D.read_rgb, "runs/gone.jpg") == f"runs/gone.jpg: image not found (a relative path, read from {tmp_path})"


def test_truncated_image_raises_with_the_file_named(fresh, tmp_path):
    table = D.add_labels(D.read_train_images(fresh / "train"), 60)  # reading does not decode
    bad = table["image_path"][4]
    truncate(bad)
    assert bad in error_of(D.decode_image, bad, RESIZE)
    transform = D.build_transform("plain", RESIZE, MEAN, STD)[0]
    message = error_of(D.make_dataset, table, make_cfg(fresh / "train", tmp_path), transform)
    assert bad in message
    _, errors = D.build_cache(table["image_path"].tolist(), RESIZE, [D.FULL_IMAGE] * len(table), tmp_path / "cache")
    assert [i for i, e in enumerate(errors) if e] == [4] and bad in errors[4]


def test_truncated_image_skipped_and_listed(fresh, tmp_path):
    table = D.add_labels(D.read_train_images(fresh / "train"), 60)
    bad = [table["image_path"][4], table["image_path"][9]]
    for path in bad:
        truncate(path)
    skipped = []
    transform = D.build_transform("plain", RESIZE, MEAN, STD)[0]
    ds = D.make_dataset(table, make_cfg(fresh / "train", tmp_path, skip_bad_images=True), transform, skipped)
    assert len(ds) == len(table) - 2
    assert [p for p, _ in skipped] == bad
    assert all(p in e for p, e in skipped)
    assert bad[0] not in ds.paths and bad[1] not in ds.paths
    keep = [i for i in range(len(table)) if i not in (4, 9)]
    for j in (0, 4, 8):  # items after the skipped ones still carry their own image and label
        x, label, age, _ = ds[j]
        row = table.iloc[keep[j]]
        assert label == row["label"] and age == row["age"]
        expected = transform(torch.from_numpy(D.decode_image(row["image_path"], RESIZE)).permute(2, 0, 1))
        assert torch.equal(x, expected)


def test_sample_data_replaces_its_own_output_of_a_failed_run(tmp_path):
    with pytest.raises(ValueError):  # PIL: cannot write empty image, after train/ was made
        make_sample_dataset(tmp_path, n_train_people=1, n_eval_people=0, size=(0, 0))
    make_sample_dataset(tmp_path, n_train_people=1, n_eval_people=0, size=SIZE)
    assert len(people_table(tmp_path)) == 1


@pytest.mark.parametrize("args, words", [(["--train_people", "-3"], "--train_people must be at least 1"),
                                         (["--eval_people", "-1"], "--eval_people at least 0"),
                                         (["--size", "0x0"], "--size must be at least 1x1, got 0x0"),
                                         (["--seed", "-1"], "--seed must be at least 0, got -1")])
def test_sample_data_refuses_bad_arguments_before_writing(tmp_path, capsys, args, words):
    import make_sample_data
    with pytest.raises(SystemExit):
        make_sample_data.main(["--out", str(tmp_path / "out"), *args])
    assert words in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sample_data_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match=f"error: {tmp_path / 'file'} is a file, not a folder"):
        make_sample_dataset(tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"
