"""Score a submission against the true answers (the sample data's eval/answers.csv, or any
ImageID,ans file): 18-class macro F1 (the competition metric), accuracy and per-task F1.

    python score.py --answers data/sample/eval/answers.csv --submission runs/exp/submission.csv
"""
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
    merged = answers.merge(submission, on="ImageID", how="left", suffixes=("_true", "_pred"))
    if merged["ans_pred"].isna().any() or len(submission) != len(answers):
        raise SystemExit(f"error: {submission_csv} does not hold exactly the ImageIDs of {answers_csv}")
    return score(merged["ans_true"], merged["ans_pred"].astype(int))


def main(cfg):
    result = score_files(cfg["answers"], cfg["submission"])
    print("  ".join(f"{k} {v:.4f}" for k, v in result.items()))
    return result


if __name__ == "__main__":
    main(parse_config("score", description=__doc__))
