"""Score a submission against the true answers (the sample data's eval/answers.csv, or any
ImageID,ans file): 18-class macro F1 (the competition metric), accuracy and per-task F1.

    python score.py --answers data/sample/eval/answers.csv --submission runs/exp/submission.csv
"""
import pandas as pd

from config import parse_config
from train import score


def score_files(answers_csv, submission_csv):
    answers, submission = pd.read_csv(answers_csv), pd.read_csv(submission_csv)
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
