"""ensemble.py (soft / hard / per-task voting, member checks, main) and score.py, on
probability tables written by hand."""
import json
import logging
import re

import numpy as np
import pandas as pd
import pytest

import ensemble
import score
from config import default_config
from dataset import NUM_CLASSES, PROB_COLUMNS, encode_class

PROBS = [f"p{c}" for c in range(NUM_CLASSES)]


def ens_cfg(tmp_path=None, **overrides):
    cfg = default_config("ensemble")
    cfg.update(method="soft", member_weights=[], task_members=[], members=[])
    if tmp_path is not None:
        cfg["submission"] = str(tmp_path / "submission.csv")
    cfg.update(overrides)
    return cfg


def peaked(classes, peak=0.5):
    """One row per class: `peak` on that class, the rest spread evenly."""
    probs = np.full((len(classes), NUM_CLASSES), (1 - peak) / (NUM_CLASSES - 1))
    probs[np.arange(len(classes)), classes] = peak
    return probs


def random_probs(n, seed):
    p = np.random.default_rng(seed).random((n, NUM_CLASSES))
    return p / p.sum(1, keepdims=True)


def write_probs(path, ids, probs):
    table = pd.DataFrame(probs, columns=PROBS)
    table.insert(0, "ImageID", ids)
    table["pred"] = probs.argmax(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False)
    return path


def write_run(folder, ids, probs, valid_paths=None, valid_probs=None, labels=None):
    """A member run folder: eval_probs.csv and, optionally, valid_probs.csv."""
    write_probs(folder / "eval_probs.csv", ids, probs)
    if valid_probs is not None:
        table = pd.DataFrame(valid_probs, columns=PROBS)
        table.insert(0, "image_path", valid_paths)
        table["pred"] = valid_probs.argmax(1)
        table["label"] = labels
        table.to_csv(folder / "valid_probs.csv", index=False)
    return folder


IDS = [f"{k:02d}.jpg" for k in range(NUM_CLASSES)]


# ---------------------------------------------------------------------------------------------
# Soft voting
def test_soft_vote_of_one_member_is_its_argmax():
    probs = random_probs(40, 0)
    np.testing.assert_array_equal(ensemble.combine([probs], ens_cfg()), probs.argmax(1))
    np.testing.assert_allclose(ensemble.soft_vote([probs]), probs)


def test_soft_vote_with_weights():
    a = np.zeros((1, NUM_CLASSES))
    a[0, :2] = [0.6, 0.4]
    b = np.zeros((1, NUM_CLASSES))
    b[0, :2] = [0.1, 0.9]
    np.testing.assert_allclose(ensemble.soft_vote([a, b]), (a + b) / 2)
    np.testing.assert_allclose(ensemble.soft_vote([a, b], [5, 1]), (5 * a + b) / 6)
    assert ensemble.combine([a, b], ens_cfg()).tolist() == [1]
    assert ensemble.combine([a, b], ens_cfg(member_weights=[5, 1])).tolist() == [0]
    assert ensemble.combine([a, b], ens_cfg(member_weights=[1, 5])).tolist() == [1]
    assert ensemble.combine([a, b], ens_cfg(member_weights=[1.0, 1.0])).tolist() == [1]


@pytest.mark.parametrize("weights", [[1.0], [1.0, 1.0, 1.0], [2.0, -1.0], [0.0, 0.0],  # 2 - 1: a sum above 0
                                     [float("nan"), 1.0], [float("inf"), 1.0]])  # both would vote class 0 everywhere
def test_soft_vote_needs_one_weight_per_member(weights):
    with pytest.raises(SystemExit, match="one weight per member"):
        ensemble.check_vote_settings(ens_cfg(member_weights=weights), 2)


# ---------------------------------------------------------------------------------------------
# Hard voting
def test_hard_vote_majority():
    preds = [[1, 2, 3, 7], [1, 5, 3, 8], [4, 5, 3, 8]]
    assert ensemble.hard_vote(preds).tolist() == [1, 5, 3, 8]
    probs = [peaked(p) for p in preds]
    assert ensemble.combine(probs, ens_cfg(method="hard")).tolist() == [1, 5, 3, 8]


def test_hard_vote_tie_goes_to_the_best_validation_f1():
    preds = [[1, 6], [2, 6]]
    assert ensemble.hard_vote(preds, [0.2, 0.8]).tolist() == [2, 6]
    assert ensemble.hard_vote(preds, [0.8, 0.2]).tolist() == [1, 6]
    # a tie between classes 1 and 2: the best member (class 3) is not in the tie, so the next best decides
    preds = [[1], [1], [2], [2], [3]]
    assert ensemble.hard_vote(preds, [0.1, 0.2, 0.5, 0.3, 0.9]).tolist() == [2]
    assert ensemble.hard_vote(preds, [0.1, 0.6, 0.5, 0.3, 0.9]).tolist() == [1]


@pytest.mark.parametrize("f1", [None, [None, None], [0.5, 0.5], [float("nan"), float("nan")]],
                         ids=["no_f1", "unknown", "equal", "nan"])
def test_hard_vote_tie_with_equal_or_unknown_f1_follows_member_order(f1):
    assert ensemble.hard_vote([[4, 9], [7, 9]], f1).tolist() == [4, 9]
    assert ensemble.hard_vote([[7, 9], [4, 9]], f1).tolist() == [7, 9]


def test_hard_vote_known_f1_beats_unknown():
    assert ensemble.hard_vote([[4], [7]], [None, 0.1]).tolist() == [7]
    assert ensemble.hard_vote([[4], [7]], [float("nan"), 0.0]).tolist() == [7]  # even a known F1 of 0


# ---------------------------------------------------------------------------------------------
# Per task
def product_probs(mask, gender, age):
    """18-class probabilities of independent task distributions (rows)."""
    p = mask[:, :, None, None] * gender[:, None, :, None] * age[:, None, None, :]
    return p.reshape(len(mask), NUM_CLASSES)


def test_per_task_takes_each_task_from_its_member():
    # member 0 is right about mask, member 1 about gender, member 2 about age; each is wrong elsewhere
    masks = [np.array([[0.1, 0.1, 0.8], [0.7, 0.2, 0.1]]), np.array([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8]]),
             np.array([[0.1, 0.8, 0.1], [0.1, 0.8, 0.1]])]
    genders = [np.array([[0.9, 0.1], [0.1, 0.9]]), np.array([[0.2, 0.8], [0.6, 0.4]]),
               np.array([[0.7, 0.3], [0.3, 0.7]])]
    ages = [np.array([[0.1, 0.1, 0.8], [0.8, 0.1, 0.1]]), np.array([[0.1, 0.8, 0.1], [0.1, 0.1, 0.8]]),
            np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])]
    probs = [product_probs(m, g, a) for m, g, a in zip(masks, genders, ages)]
    expected = [int(encode_class(2, 1, 0)), int(encode_class(0, 0, 2))]
    assert ensemble.per_task(probs, [0, 1, 2]).tolist() == expected
    assert ensemble.combine(probs, ens_cfg(method="per_task", task_members=[0, 1, 2])).tolist() == expected
    for p in probs:  # no single member, nor the soft vote, gives that answer
        assert p.argmax(1).tolist() != expected
    assert ensemble.combine(probs, ens_cfg()).tolist() != expected
    # the same member for every task is that member's own answer
    for k, p in enumerate(probs):
        assert ensemble.per_task(probs, [k, k, k]).tolist() == p.argmax(1).tolist()


@pytest.mark.parametrize("task_members", [[0, 1], [0, 1, 3], [0, 1, -1]])
def test_per_task_needs_three_valid_members(task_members):
    with pytest.raises(SystemExit, match="task_members"):
        ensemble.check_vote_settings(ens_cfg(method="per_task", task_members=task_members), 3)


def test_unknown_method_is_refused_before_the_members_are_read(tmp_path):
    with pytest.raises(SystemExit, match="method 'median' is not soft, hard or per_task"):
        ensemble.main(ens_cfg(tmp_path, method="median", members=[str(tmp_path / "no_such_run")]))


# ---------------------------------------------------------------------------------------------
# Members
def test_members_with_different_ids_are_refused(tmp_path):
    a = write_probs(tmp_path / "a.csv", ["x1.jpg", "x2.jpg", "x3.jpg"], random_probs(3, 0))
    b = write_probs(tmp_path / "b.csv", ["x1.jpg", "x2.jpg", "x4.jpg"], random_probs(3, 1))
    with pytest.raises(SystemExit) as error:
        ensemble.check_same_ids([ensemble.Member(a), ensemble.Member(b)])
    message = str(error.value)
    assert "x3.jpg" in message and "x4.jpg" in message and "x1.jpg" not in message
    with pytest.raises(SystemExit, match="x4.jpg"):
        ensemble.main(ens_cfg(tmp_path, members=[str(a), str(b)]))
    assert not (tmp_path / "submission.csv").exists()


def test_members_in_another_order_are_refused(tmp_path):
    a = write_probs(tmp_path / "a.csv", ["x1.jpg", "x2.jpg"], random_probs(2, 0))
    b = write_probs(tmp_path / "b.csv", ["x2.jpg", "x1.jpg"], random_probs(2, 1))
    with pytest.raises(SystemExit, match="another order"):
        ensemble.check_same_ids([ensemble.Member(a), ensemble.Member(b)])


def test_member_files_are_checked(tmp_path):
    with pytest.raises(SystemExit, match="--members .*missing.csv: no such run folder or file"):
        ensemble.Member(tmp_path / "missing.csv")
    with pytest.raises(SystemExit, match="not found"):
        ensemble.Member(tmp_path)  # a folder without eval_probs.csv
    pd.DataFrame({"ImageID": ["a"], "p0": [1.0]}).to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(SystemExit, match="short.csv: missing column.*p17"):
        ensemble.Member(tmp_path / "short.csv")
    (tmp_path / "broken.csv").write_text('ImageID,' + ','.join(PROB_COLUMNS) + '\n"a,0.5\n')
    with pytest.raises(SystemExit, match="broken.csv: cannot parse CSV"):
        ensemble.Member(tmp_path / "broken.csv")
    (tmp_path / "text.csv").write_text('ImageID,' + ','.join(PROB_COLUMNS) + '\na,' + ','.join(['x'] * 18) + '\n')
    with pytest.raises(SystemExit, match=r"text.csv: column p0: \['x'\] not numbers"):
        ensemble.Member(tmp_path / "text.csv")
    with pytest.raises(SystemExit, match="--members"):
        ensemble.main(ens_cfg(tmp_path))


def test_a_member_with_repeated_ids_is_refused(tmp_path):
    ids = ["x1.jpg", "x2.jpg", "x2.jpg", "x3.jpg", "x3.jpg", "x3.jpg"]
    a = write_probs(tmp_path / "a.csv", ids, random_probs(6, 0))
    with pytest.raises(SystemExit, match=re.escape(f"{a}: 2 ImageID(s) appear more than once: ['x2.jpg', 'x3.jpg']")):
        ensemble.Member(a)
    run = write_run(tmp_path / "run", ids, random_probs(6, 1))
    with pytest.raises(SystemExit, match=re.escape(f"{run / 'eval_probs.csv'}: 2 ImageID(s)")):
        ensemble.main(ens_cfg(tmp_path, members=[str(run)]))
    assert not (tmp_path / "submission.csv").exists()


@pytest.mark.parametrize("bad", [5.0, -3.0, float("inf")])
def test_probabilities_outside_0_1_are_refused(tmp_path, bad):
    probs = random_probs(3, 0)
    probs[1, 4] = bad
    a = write_probs(tmp_path / "a.csv", ["x1.jpg", "x2.jpg", "x3.jpg"], probs)
    with pytest.raises(SystemExit, match=re.escape(f"{a}: 1 row(s) with p0..p17 not numbers in [0, 1], e.g. ImageID ['x2.jpg']")):
        ensemble.Member(a)


def test_probabilities_must_sum_to_1_within_rounding(tmp_path):
    probs = random_probs(len(IDS), 0)
    write_probs(tmp_path / "f32.csv", IDS, probs.astype(np.float32))  # as inference.py writes them
    ensemble.Member(tmp_path / "f32.csv")
    write_probs(tmp_path / "rounded.csv", IDS, probs.round(3))
    ensemble.Member(tmp_path / "rounded.csv")
    scores = probs.copy()
    scores[2] *= 1.5  # in [0, 1], but not probabilities
    a = write_probs(tmp_path / "a.csv", IDS, scores)
    with pytest.raises(SystemExit, match=re.escape(f"{a}: 1 row(s) whose p0..p17 do not sum to 1, e.g. ImageID "
                                                   f"['{IDS[2]}'] (sums [1.5])")):
        ensemble.Member(a)


def test_the_submission_path_is_checked_before_the_members(tmp_path):
    a = write_probs(tmp_path / "a.csv", IDS, random_probs(len(IDS), 0))
    (tmp_path / "out").mkdir()
    with pytest.raises(SystemExit, match=re.escape(f"--submission {tmp_path / 'out'} is a folder")):
        ensemble.main(ens_cfg(members=[str(a)], submission=str(tmp_path / "out")))
    assert not (tmp_path / "out.tmp").exists() and not (tmp_path / "out.report.json").exists()
    (tmp_path / "file").write_text("a file\n")
    with pytest.raises(SystemExit, match=re.escape(f"cannot make its folder {tmp_path / 'file' / 'sub'}")):
        ensemble.main(ens_cfg(members=[str(a)], submission=str(tmp_path / "file" / "sub" / "ens.csv")))
    with pytest.raises(SystemExit, match="is a folder"):  # before a bad member is read
        ensemble.main(ens_cfg(members=[str(tmp_path / "missing.csv")], submission=str(tmp_path / "out")))


def test_replacing_an_earlier_submission_is_logged(tmp_path, capsys):
    a = write_probs(tmp_path / "a.csv", IDS, random_probs(len(IDS), 0))
    ensemble.main(ens_cfg(members=[str(a)], submission=str(tmp_path / "ens.csv")))
    assert "(replacing the earlier ones)" not in capsys.readouterr().out
    ensemble.main(ens_cfg(members=[str(a)], submission=str(tmp_path / "ens.csv")))
    assert f"wrote {tmp_path / 'ens.csv'} and {tmp_path / 'ens.csv'}.report.json (replacing the earlier ones)" in \
        capsys.readouterr().out


def test_a_member_given_twice_is_refused(tmp_path):
    """RUNS="runs/a runs/a" would count run a twice without saying so."""
    a = write_probs(tmp_path / "a" / "eval_probs.csv", IDS, random_probs(len(IDS), 0))
    with pytest.raises(SystemExit, match="given more than once.*--member_weights"):
        ensemble.main(ens_cfg(members=[str(a.parent), str(a)], submission=str(tmp_path / "ens.csv")))
    assert not (tmp_path / "ens.csv").exists()


@pytest.mark.parametrize("damage, message", [
    (lambda path: path.write_text(""), "cannot parse CSV"),
    (lambda path: path.write_text(path.read_text().replace(",0\n", ",18\n", 1)), r"line\(s\) \[\d+\]: pred and label"),
    (lambda path: path.write_text(path.read_text().splitlines()[0] + "\n"), "no rows"),
    (lambda path: pd.read_csv(path).assign(p3=lambda t: t["p3"] + 0.5).to_csv(path, index=False),
     r"18 row\(s\) whose p0..p17 do not sum to 1, e.g. image_path \['img/"),
])
def test_a_damaged_validation_table_is_named(tmp_path, damage, message):
    probs = random_probs(len(IDS), 0)
    a = write_run(tmp_path / "a", IDS, probs, [f"img/{i}" for i in IDS], probs, np.arange(NUM_CLASSES))
    b = write_probs(tmp_path / "b" / "eval_probs.csv", IDS, random_probs(len(IDS), 1))
    damage(a / "valid_probs.csv")
    with pytest.raises(SystemExit, match=f"error: {re.escape(str(a / 'valid_probs.csv'))}: {message}"):
        ensemble.main(ens_cfg(members=[str(a), str(b)], submission=str(tmp_path / "ens.csv")))
    assert not (tmp_path / "ens.csv").exists()


# ---------------------------------------------------------------------------------------------
# main
def test_main_with_two_member_files(tmp_path):
    a_probs, b_probs = random_probs(len(IDS), 0), random_probs(len(IDS), 1)
    a = write_probs(tmp_path / "a" / "eval_probs.csv", IDS, a_probs)
    b = write_probs(tmp_path / "b" / "eval_probs.csv", IDS, b_probs)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "submission.csv").write_text("an older submission\n")
    out, report = ensemble.main(ens_cfg(members=[str(a), str(b)], submission=str(out_dir / "ens.csv")))
    assert out == out_dir / "ens.csv"
    submission = pd.read_csv(out)
    assert submission["ImageID"].tolist() == IDS
    assert submission["ans"].between(0, NUM_CLASSES - 1).all()
    expected = ((a_probs + b_probs) / 2).argmax(1)
    np.testing.assert_array_equal(submission["ans"], expected)
    assert (out_dir / "submission.csv").read_text() == "an older submission\n"  # left alone

    saved = json.loads((out_dir / "ens.csv.report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["method"] == "soft" and saved["members"] == [str(a), str(b)]
    assert saved["member_valid_f1"] == [None, None] and saved["validation"] == {}
    a_pred, b_pred = a_probs.argmax(1), b_probs.argmax(1)
    between = float((a_pred == b_pred).mean())
    assert 0 < between < 1
    np.testing.assert_allclose(saved["agreement"], [[1.0, between], [between, 1.0]])
    np.testing.assert_allclose(saved["agreement_with_ensemble"],
                               [(a_pred == expected).mean(), (b_pred == expected).mean()])


def test_main_with_run_folders_reports_validation_and_breaks_ties_by_f1(tmp_path):
    ids = IDS[:6]
    valid_paths = [f"/data/train/{k}.jpg" for k in range(8)]
    labels = np.array([0, 1, 2, 3, 4, 5, 6, 7])
    good_valid = peaked(labels)  # right on every validation image
    bad_valid = peaked((labels + 1) % NUM_CLASSES)  # wrong on every one
    a_eval, b_eval = peaked([0, 1, 2, 3, 4, 5]), peaked([6, 7, 8, 9, 10, 5])  # disagree except the last
    a = write_run(tmp_path / "a", ids, a_eval, valid_paths, bad_valid, labels)
    b = write_run(tmp_path / "b", ids, b_eval, valid_paths, good_valid, labels)
    out, report = ensemble.main(ens_cfg(tmp_path, members=[str(a), str(b)], method="hard"))
    assert out == tmp_path / "submission.csv"
    # every 1-1 tie goes to member b, whose validation F1 is better
    assert pd.read_csv(out)["ans"].tolist() == [6, 7, 8, 9, 10, 5]
    assert report["member_valid_f1"][0] == 0.0 and report["member_valid_f1"][1] == 1.0
    validation = report["validation"]
    assert validation["images"] == len(valid_paths)
    assert validation["member_f1"] == [0.0, 1.0]
    assert validation["ensemble"]["f1"] == 1.0
    assert report["agreement"][0][1] == pytest.approx(1 / 6)
    saved = json.loads((tmp_path / "submission.csv.report.json").read_text())
    assert saved["validation"]["ensemble"]["f1"] == 1.0


def test_validation_is_scored_against_the_true_labels_not_a_member_s_predictions(tmp_path):
    ids = IDS[:3]
    valid_paths = [f"/data/train/{k}.jpg" for k in range(8)]
    labels = np.array([0, 1, 2, 3, 4, 5, 6, 7])
    half_wrong = np.where(np.arange(8) < 4, labels, (labels + 1) % NUM_CLASSES)
    a = write_run(tmp_path / "a", ids, peaked([0, 1, 2]), valid_paths, peaked(labels, 0.6), labels)
    last = write_run(tmp_path / "last", ids, peaked([0, 1, 2]), valid_paths, peaked(half_wrong, 0.5), labels)
    _, report = ensemble.main(ens_cfg(tmp_path, members=[str(a), str(last)]))
    validation = report["validation"]
    last_f1 = ensemble.score(labels, half_wrong)["f1"]
    assert 0 < last_f1 < 1
    assert validation["member_f1"] == pytest.approx([1.0, last_f1])
    assert validation["ensemble"]["f1"] == 1.0  # the soft vote follows member a where the last member is wrong


def test_main_per_task(tmp_path):
    probs = [random_probs(len(IDS), k) for k in range(3)]
    members = [str(write_probs(tmp_path / f"m{k}.csv", IDS, p)) for k, p in enumerate(probs)]
    out, _ = ensemble.main(ens_cfg(tmp_path, members=members, method="per_task", task_members=[2, 0, 1]))
    np.testing.assert_array_equal(pd.read_csv(out)["ans"], ensemble.per_task(probs, [2, 0, 1]))


# ---------------------------------------------------------------------------------------------
# score.py
@pytest.fixture
def answers(tmp_path):
    ids = [f"{k:03d}.jpg" for k in range(2 * NUM_CLASSES)]
    table = pd.DataFrame({"ImageID": ids, "ans": list(range(NUM_CLASSES)) * 2})
    table.to_csv(tmp_path / "answers.csv", index=False)
    return table


def test_score_of_the_answers_is_perfect(tmp_path, answers):
    answers.sample(frac=1, random_state=0).to_csv(tmp_path / "submission.csv", index=False)  # order is free
    result = score.score_files(tmp_path / "answers.csv", tmp_path / "submission.csv")
    assert result["f1"] == 1.0 and result["accuracy"] == 1.0
    assert result["mask_f1"] == result["gender_f1"] == result["age_f1"] == 1.0


def test_scoring_against_answers_of_one_class_warns(tmp_path, answers, capsys):
    """info.csv's ans column is a placeholder (all 0): scoring against it is a likely mistake."""
    answers.to_csv(tmp_path / "submission.csv", index=False)
    score.score_files(tmp_path / "answers.csv", tmp_path / "submission.csv")
    assert capsys.readouterr().err == ""
    answers.assign(ans=0).to_csv(tmp_path / "info.csv", index=False)
    score.score_files(tmp_path / "info.csv", tmp_path / "submission.csv")
    assert "warning: every answer in " in capsys.readouterr().err


def test_score_of_a_wrong_submission(tmp_path, answers):
    wrong = answers.assign(ans=(answers["ans"] + 1) % NUM_CLASSES)
    wrong.to_csv(tmp_path / "submission.csv", index=False)
    result = score.score_files(tmp_path / "answers.csv", tmp_path / "submission.csv")
    assert result["f1"] == 0.0 and result["accuracy"] == 0.0
    half = answers.copy()
    half.loc[::2, "ans"] = (half.loc[::2, "ans"] + 6) % NUM_CLASSES  # wrong mask on every other image
    half.to_csv(tmp_path / "submission.csv", index=False)
    result = score.score_files(tmp_path / "answers.csv", tmp_path / "submission.csv")
    assert result["accuracy"] == 0.5 and result["gender_f1"] == 1.0 and result["age_f1"] == 1.0
    assert result["mask_f1"] < 1.0


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_score_refuses_other_ids(tmp_path, answers, change):
    submission = answers.iloc[1:] if change == "missing" else pd.concat(
        [answers, pd.DataFrame({"ImageID": ["zzz.jpg"], "ans": [0]})])
    submission.to_csv(tmp_path / "submission.csv", index=False)
    named = r"1 missing \(e.g. \['000.jpg'\]\), 0 not in" if change == "missing" else r"0 missing .*1 not in the answers \(e.g. \['zzz.jpg'\]\)"
    with pytest.raises(SystemExit, match="does not hold exactly the ImageIDs of .*answers.csv: " + named):
        score.score_files(tmp_path / "answers.csv", tmp_path / "submission.csv")


def test_score_refuses_an_imageid_given_twice_in_either_file(tmp_path, answers):
    """Two files each repeating a different id have the same number of rows and every id of the
    other: merged, they would score without an error."""
    submission = answers.copy()
    submission.loc[1, "ImageID"] = submission.loc[2, "ImageID"]
    submission.to_csv(tmp_path / "submission.csv", index=False)
    with pytest.raises(SystemExit, match=r"submission.csv: 1 ImageID\(s\) appear more than once, e.g. \['002.jpg'\]"):
        score.score_files(tmp_path / "answers.csv", tmp_path / "submission.csv")
    pd.concat([answers, answers.iloc[[0]]]).to_csv(tmp_path / "answers.csv", index=False)
    with pytest.raises(SystemExit, match=r"answers.csv: 1 ImageID\(s\) appear more than once, e.g. \['000.jpg'\]"):
        score.score_files(tmp_path / "answers.csv", tmp_path / "submission.csv")


@pytest.mark.parametrize("bad", [18, -1, 3.7])
def test_score_refuses_classes_outside_0_to_17(tmp_path, answers, bad):
    answers.assign(ans=answers["ans"].astype(object)).assign(
        ans=lambda t: [bad, *t["ans"][1:]]).to_csv(tmp_path / "submission.csv", index=False)
    with pytest.raises(SystemExit, match=r"submission.csv: 1 ans value\(s\) are not classes 0..17"):
        score.score_files(tmp_path / "answers.csv", tmp_path / "submission.csv")


def test_score_names_the_file_that_is_missing_or_malformed(tmp_path, answers):
    with pytest.raises(SystemExit, match="submission.csv: file not found"):
        score.score_files(tmp_path / "answers.csv", tmp_path / "submission.csv")
    answers.rename(columns={"ans": "class"}).to_csv(tmp_path / "submission.csv", index=False)
    with pytest.raises(SystemExit, match=r"submission.csv: missing column\(s\) \['ans'\]"):
        score.score_files(tmp_path / "answers.csv", tmp_path / "submission.csv")


def test_a_run_with_a_pseudo_label_stage_has_no_validation_to_report(tmp_path):
    """Its eval_probs.csv comes from pseudo/, which has no validation; the first stage's
    validation probabilities belong to other models and are not reported as its own."""
    labels = np.arange(8)
    run = write_run(tmp_path / "run", IDS[:6], peaked([0, 1, 2, 3, 4, 5]), [f"/t/{k}.jpg" for k in range(8)],
                    peaked(labels), labels)
    assert ensemble.Member(run).valid_f1 == 1.0
    (run / "pseudo").mkdir()
    member = ensemble.Member(run)
    assert member.valid is None and member.valid_f1 is None


@pytest.mark.parametrize("other_models", ["refit", "last"])
def test_validation_of_other_models_than_the_ones_that_predicted_eval_is_not_reported(tmp_path, other_models):
    """A refit model trained on the validation people, and eval predicted with last.pt while
    the validation probabilities come from best.pt (inference.json says which)."""
    labels = np.arange(8)
    run = write_run(tmp_path / "run", IDS[:6], peaked([0, 1, 2, 3, 4, 5]), [f"/t/{k}.jpg" for k in range(8)],
                    peaked(labels), labels)
    record = {"config": {"checkpoint": "best"}, "models": [{"checkpoint": str(run / "best.pt"), "in_output_dir": "best.pt"}]}
    (run / "inference.json").write_text(json.dumps(record))
    assert ensemble.Member(run).valid_f1 == 1.0
    (run / "refit").mkdir()  # a later stage alone changes nothing: the record says best.pt predicted eval
    assert ensemble.Member(run).valid_f1 == 1.0
    checkpoint = "refit/best.pt" if other_models == "refit" else "last.pt"  # inference.py --checkpoint last
    (run / "inference.json").write_text(json.dumps(
        {"config": {"checkpoint": "best" if other_models == "refit" else "last"},
         "models": [{"checkpoint": str(run / checkpoint), "in_output_dir": checkpoint}]}))
    member = ensemble.Member(run)
    assert member.valid is None and member.valid_f1 is None


@pytest.mark.parametrize("models, validated", [
    (["RUN/best.pt"], True),  # records of older inference.py: the path alone
    (["/elsewhere/moved/run/fold0/best.pt", "/elsewhere/moved/run/fold1/best.pt"], True),  # the folder moved since
    (["RUN/last.pt"], False),  # --run RUN/last.pt, written into the run folder
    (["RUN/best.pt", "runs/other/pseudo/best.pt"], False),  # a blend written there with --output_dir RUN
    ([("/old/name/fold0/best.pt", "fold0/best.pt")], True),  # the run renamed since: its own, as recorded
    ([("/other/run/best.pt", None)], False),  # another run of the same folder name predicted into this one
    ([("RUN/last.pt", "last.pt")], False),
])
def test_validation_is_reported_only_for_the_run_s_own_best_models(tmp_path, models, validated, caplog):
    """inference.json names the checkpoints that predicted eval: the run's validation describes
    them only when they are its own best.pt models."""
    labels = np.arange(8)
    run = write_run(tmp_path / "run", IDS[:6], peaked([0, 1, 2, 3, 4, 5]), [f"/t/{k}.jpg" for k in range(8)],
                    peaked(labels), labels)
    models = [{"checkpoint": m.replace("RUN", str(run)), "weight": 1.0} if isinstance(m, str) else
              {"checkpoint": m[0].replace("RUN", str(run)), "weight": 1.0, "in_output_dir": m[1]} for m in models]
    (run / "inference.json").write_text(json.dumps({"config": {"checkpoint": "best"}, "models": models}))
    with caplog.at_level(logging.INFO):
        member = ensemble.Member(run)
    assert (member.valid_f1 == 1.0) if validated else (member.valid is None and member.valid_f1 is None)
    assert validated or f"eval was predicted with {models[-1]['checkpoint']}" in caplog.text


def test_members_predicted_from_different_eval_folders_are_named_in_a_warning(tmp_path, capsys):
    runs = [write_run(tmp_path / name, IDS[:6], peaked([0, 1, 2, 3, 4, 5])) for name in ("a", "b", "c")]
    for run, folder in zip(runs, ["data/eval/images", "data/eval/images", "copy/eval/images"]):
        (run / "inference.json").write_text(json.dumps({"config": {"checkpoint": "best"}, "eval_images": folder, "models": []}))
    ensemble.main(ens_cfg(tmp_path, members=[str(r) for r in runs[:2]]))
    assert "folders" not in capsys.readouterr().out
    ensemble.main(ens_cfg(tmp_path, members=[str(r) for r in runs]))
    out = capsys.readouterr().out
    assert "the members predicted eval images from 2 folders" in out and "copy/eval/images" in out


def test_the_submission_follows_info_csv_of_the_eval_folder_the_members_predicted(tmp_path):
    """Members read in their own order (e.g. sorted CSVs) are put in info.csv's order, answers
    moving with their ImageIDs; an info.csv changed since the prediction is refused."""
    (tmp_path / "eval" / "images").mkdir(parents=True)
    info_ids = IDS[:6][::-1]
    pd.DataFrame({"ImageID": info_ids, "ans": 0}).to_csv(tmp_path / "eval" / "info.csv", index=False)
    run = write_run(tmp_path / "run", IDS[:6], peaked([0, 1, 2, 3, 4, 5]))
    (run / "inference.json").write_text(json.dumps({"config": {"checkpoint": "best"}, "models": [],
                                                    "eval_images": str(tmp_path / "eval" / "images")}))
    out, _ = ensemble.main(ens_cfg(tmp_path, members=[str(run)]))
    written = pd.read_csv(out)
    assert written["ImageID"].tolist() == info_ids and written["ans"].tolist() == [5, 4, 3, 2, 1, 0]
    pd.DataFrame({"ImageID": IDS[:5] + ["new.jpg"], "ans": 0}).to_csv(tmp_path / "eval" / "info.csv", index=False)
    with pytest.raises(SystemExit, match=r"not those of .*info.csv.*only in the members: \['05.jpg'\]; "
                                         r"only in info.csv: \['new.jpg'\]"):
        ensemble.main(ens_cfg(tmp_path, members=[str(run)], submission=str(tmp_path / "second.csv")))
    assert not (tmp_path / "second.csv").exists()


def test_a_csv_kept_beside_a_run_has_none_of_the_runs_validation(tmp_path):
    """Only the run's eval_probs.csv is what its inference.json and validation describe: a copy
    of other predictions kept in the folder (e.g. last.pt's, renamed) is a plain CSV member."""
    labels = np.arange(8)
    run = write_run(tmp_path / "run", IDS[:6], peaked([0, 1, 2, 3, 4, 5]), [f"/t/{k}.jpg" for k in range(8)],
                    peaked(labels), labels)
    assert ensemble.Member(run / "eval_probs.csv").valid_f1 == 1.0
    other = write_probs(run / "eval_probs_last.csv", IDS[:6], peaked([5, 4, 3, 2, 1, 0]))
    member = ensemble.Member(other)
    assert member.valid is None and member.valid_f1 is None and member.eval_images is None


def test_the_submission_cannot_replace_a_members_probabilities(tmp_path):
    a = write_run(tmp_path / "a", IDS[:6], peaked([0, 1, 2, 3, 4, 5]))
    b = write_probs(tmp_path / "b.csv", IDS[:6], peaked([5, 4, 3, 2, 1, 0]))
    before = (a / "eval_probs.csv").read_text()
    for target in (a / "eval_probs.csv", b):
        with pytest.raises(SystemExit, match="is a member's probabilities"):
            ensemble.main(ens_cfg(members=[str(a), str(b)], submission=str(target)))
    assert (a / "eval_probs.csv").read_text() == before


def test_a_damaged_inference_json_is_named(tmp_path):
    labels = np.arange(8)
    run = write_run(tmp_path / "run", IDS[:6], peaked([0, 1, 2, 3, 4, 5]), [f"/t/{k}.jpg" for k in range(8)],
                    peaked(labels), labels)
    (run / "inference.json").write_text('{"config": {"checkp')
    with pytest.raises(SystemExit, match=r"run/inference.json: not an inference.json that inference.py wrote "
                                         r"\(JSONDecodeError.*predict again with inference.py --run"):
        ensemble.Member(run)
    (run / "inference.json").write_text('{"config": {}, "models": [{"weight": 1.0}]}')
    with pytest.raises(SystemExit, match=r"not an inference.json that inference.py wrote \(no list of models, each "
                                         r"with its checkpoint\)"):
        ensemble.Member(run)


def test_validation_matches_one_image_named_two_ways(tmp_path, monkeypatch, capsys):
    """One run trained with a relative --data_dir, another with the absolute one: the same
    validation images, which the report must still find shared."""
    monkeypatch.chdir(tmp_path)
    labels = np.arange(8)
    relative = [f"data/train/{k}.jpg" for k in range(8)]
    a = write_run(tmp_path / "a", IDS[:6], peaked([0, 1, 2, 3, 4, 5]), relative, peaked(labels), labels)
    b = write_run(tmp_path / "b", IDS[:6], peaked([0, 1, 2, 3, 4, 5]), [str(tmp_path / p) for p in relative],
                  peaked(labels), labels)
    _, report = ensemble.main(ens_cfg(tmp_path, members=[str(a), str(b)]))
    assert report["validation"]["images"] == 8 and report["validation"]["ensemble"]["f1"] == 1.0
    c = write_run(tmp_path / "c", IDS[:6], peaked([0, 1, 2, 3, 4, 5]), [f"other/{k}.jpg" for k in range(8)],
                  peaked(labels), labels)
    _, report = ensemble.main(ens_cfg(tmp_path, members=[str(a), str(c)]))
    assert report["validation"] == {} and "validation images do not overlap" in capsys.readouterr().out


@pytest.mark.parametrize("method, option", [("hard", {"member_weights": [2, 1]}), ("per_task", {"member_weights": [2, 1]}),
                                            ("soft", {"task_members": [0, 1, 0]}), ("hard", {"task_members": [0, 1, 0]})])
def test_options_another_method_would_ignore_are_refused(method, option):
    with pytest.raises(SystemExit, match=f"--{next(iter(option))} .* --method {method} would ignore them"):
        ensemble.check_vote_settings(ens_cfg(method=method, **option), 2)
