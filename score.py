"""Score a submission against the true answers (the sample data's eval/answers.csv, or any
ImageID,ans file): 18-class macro F1 (the competition metric), accuracy and per-task F1.

    python score.py --answers data/sample/eval/answers.csv --submission runs/exp/submission.csv
"""
import sys

from config import parse_config
from dataset import NUM_CLASSES, DataError, is_class, read_csv
from train import score


def score_files(answers_csv, submission_csv):
    try:
        answers, submission = (read_csv(path, ["ImageID", "ans"], numeric=["ans"]) for path in (answers_csv, submission_csv))
    except DataError as e:  # the message names the file and the problem
        raise SystemExit(f"error: {e}")
    for path, table in ((answers_csv, answers), (submission_csv, submission)):
        bad = table.loc[~is_class(table["ans"]), ["ImageID", "ans"]]
        if len(bad):
            raise SystemExit(f"error: {path}: {len(bad)} ans value(s) are not classes 0..{NUM_CLASSES - 1}, "
                             f"e.g. {bad.head(3).values.tolist()}")
        repeated = table["ImageID"][table["ImageID"].duplicated()].unique()
        if len(repeated):
            raise SystemExit(f"error: {path}: {len(repeated)} ImageID(s) appear more than once, e.g. {list(repeated[:3])}")
    missing = sorted(set(answers["ImageID"]) - set(submission["ImageID"]))
    extra = sorted(set(submission["ImageID"]) - set(answers["ImageID"]))
    if missing or extra:
        raise SystemExit(f"error: {submission_csv} does not hold exactly the ImageIDs of {answers_csv}: {len(missing)} "
                         f"missing (e.g. {missing[:3]}), {len(extra)} not in the answers (e.g. {extra[:3]})")
    if len(answers) > 1 and answers["ans"].nunique() == 1:
        print(f"warning: every answer in {answers_csv} is class {answers['ans'].iloc[0]}, so this macro F1 says little; "
              "the competition's eval/info.csv holds 0 in every row, a placeholder, not the answers", file=sys.stderr)
    merged = answers.merge(submission, on="ImageID", suffixes=("_true", "_pred"))
    return score(merged["ans_true"], merged["ans_pred"].astype(int))


def main(cfg):
    result = score_files(cfg["answers"], cfg["submission"])
    print("  ".join(f"{k} {v:.4f}" for k, v in result.items()))
    return result


if __name__ == "__main__":
    main(parse_config("score", description=__doc__))
