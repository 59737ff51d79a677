"""report.py: every picture of a trained run is a readable PNG whose size follows its content,
Grad-CAM is a heat map of the predicted class, a k-fold run gets one report per fold, and a folder
without validation is refused by name."""
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.metrics import confusion_matrix

import report
import train
from dataset import PROB_COLUMNS, class_name, decode_class
from model import MaskModel, class_probabilities, create_model
from report import grad_cam, write_report

NAMES = ["confusion_18", "confusion_mask", "confusion_gender", "confusion_age", "curves", "worst", "gradcam"]


@pytest.fixture
def run_dir(train_cfg):
    """A finished 2-epoch run (two points per curve) with validation."""
    run_dir, _ = train.main({**train_cfg, "epochs": 2, "device": "cpu"})
    return run_dir


def open_png(path):
    image = Image.open(path)
    assert image.format == "PNG", path
    image.load()  # decodes every pixel: a truncated file raises here
    return image.convert("RGB")


def test_report_writes_every_picture(run_dir):
    paths = write_report(run_dir, images_per_class=1)
    assert paths == [run_dir / "report" / f"{name}.png" for name in NAMES]
    images = {path.stem: open_png(path) for path in paths}
    for name, image in images.items():
        assert min(image.size) >= 100, (name, image.size)
        assert len(image.getcolors(1 << 24)) > 20, f"{name} is nearly blank"  # text, cells, lines, photos
    # 18 cells a side against 3 and 2: the big matrix is drawn larger, the per-task ones ordered by size
    assert images["confusion_18"].width > images["confusion_mask"].width >= images["confusion_gender"].width
    assert images["confusion_18"].height > images["confusion_mask"].height > images["confusion_gender"].height

    # Grad-CAM: one tile per class per image; twice the images per class make a different sheet
    again = open_png(write_report(run_dir, images_per_class=2)[-1])
    assert again.size != images["gradcam"].size


def test_report_draws_the_confusions_the_worst_images_and_the_best_epoch_of_the_run(run_dir, monkeypatch):
    """What the pictures show comes from valid_probs.csv and metrics.csv: rows the true class,
    the images least sure of their true class, the epoch of the best validation macro F1."""
    table = pd.read_csv(run_dir / "valid_probs.csv")
    n = len(table)
    label = np.arange(n) % 18
    pred = np.where(np.arange(n) % 2 == 0, (label + 1) % 18, label)  # every other image one class off
    p_true = np.where(pred == label, 0.9, np.linspace(0.01, 0.09, n))
    probs = np.full((n, 18), 0.0)
    probs[np.arange(n), pred] = 0.9
    probs[np.arange(n), label] = p_true
    probs[np.arange(n), (label + 2) % 18] = 1 - probs.sum(1)  # the rest on a third class: rows sum to 1
    table[PROB_COLUMNS], table["pred"], table["label"] = probs, pred, label
    table.to_csv(run_dir / "valid_probs.csv", index=False)
    metrics = pd.read_csv(run_dir / "metrics.csv")
    metrics["valid_f1"] = [0.6, 0.4]  # the best epoch is the first
    metrics.to_csv(run_dir / "metrics.csv", index=False)
    drawn = {"matrices": [], "best": [], "tiles": []}

    def record(name, real, pick):
        def wrapper(*args, **kwargs):
            drawn[name].append(pick(*args, **kwargs))
            return real(*args, **kwargs)
        monkeypatch.setattr(report, real.__name__, wrapper)

    record("matrices", report.heatmap, lambda matrix, labels, title: matrix)
    record("best", report.line_plot, lambda series, title, y_range, best=None: best)
    record("tiles", report.tile, lambda image, lines: lines[:2])
    write_report(run_dir, images_per_class=1)
    expected = [confusion_matrix(label, pred, labels=range(18))]
    expected += [confusion_matrix(t, p, labels=range(k)) for t, p, k in zip(decode_class(label), decode_class(pred), (3, 2, 3))]
    assert len(drawn["matrices"]) == 4
    for got, want in zip(drawn["matrices"], expected):
        np.testing.assert_array_equal(got, want)
    assert drawn["best"] == [None, 1]  # the loss panel has no best epoch; the F1 panel marks epoch 1
    worst = np.argsort(p_true, kind="stable")[:report.WORST]
    assert drawn["tiles"][:report.WORST] == [[f"true: {class_name(label[i])} (p={p_true[i]:.2f})",
                                              f"pred: {class_name(pred[i])} (p=0.90)"] for i in worst]
    # Grad-CAM: one image of each true class (not of each predicted class), in class order
    assert [lines[0] for lines in drawn["tiles"][report.WORST:]] == [f"true: {class_name(c)}" for c in range(18)]


def test_grad_cam_is_a_heat_map_of_the_predicted_class(train_cfg):
    torch.manual_seed(0)
    model = create_model({**train_cfg, "pretrained": False}).eval()
    images = torch.randn(3, 3, *train_cfg["resize"])
    cams, probs = grad_cam(model, images, (64, 48))
    assert cams.shape == (3, 64, 48)
    assert cams.min() >= 0 and torch.allclose(cams.amax((1, 2)), torch.ones(3))  # scaled to 0..1 per image
    assert cams.std((1, 2)).min() > 0  # not flat: the map picks out places
    with torch.no_grad():
        torch.testing.assert_close(probs, class_probabilities(model(images)))
    assert not model.backbone._forward_hooks  # the hook is removed again


class FirstChannel(torch.nn.Module):
    """A backbone whose feature map is the image's first channel, pixel for pixel."""
    num_features, pooled_norm = 1, torch.nn.Identity()

    def forward(self, x):
        return x[:, :1]


def test_grad_cam_points_at_the_evidence_for_the_predicted_class():
    """Class 5's logit grows with the mean brightness, so in an image that is dark but for one
    bright patch the patch is all of class 5's evidence: the map is 1 there and 0 elsewhere."""
    model = MaskModel(FirstChannel(), head="single", dropout=0.0).eval()
    with torch.no_grad():
        model.heads["logits"].weight.zero_()
        model.heads["logits"].bias.zero_()
        model.heads["logits"].weight[5, 0] = 50.0
    image = torch.zeros(1, 3, 16, 12)
    image[..., 2:6, 7:11] = 1.0
    cams, probs = grad_cam(model, image, (16, 12))
    assert probs.argmax().item() == 5
    expected = torch.zeros(1, 16, 12)
    expected[:, 2:6, 7:11] = 1.0
    torch.testing.assert_close(cams, expected)


def test_kfold_run_gets_a_report_per_fold(run_dir, tmp_path):
    kfold = tmp_path / "kfold"
    for k in (0, 1):
        shutil.copytree(run_dir, kfold / f"fold{k}")
    paths = write_report(kfold, images_per_class=1)
    assert paths == [kfold / f"fold{k}" / "report" / f"{name}.png" for k in (0, 1) for name in NAMES]
    assert all(path.is_file() for path in paths)
    assert not (kfold / "report").exists()


def test_folder_without_validation_is_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "fold0").mkdir()  # a fold folder without valid_probs.csv does not count
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path)) + ": no valid_probs.csv"):
        write_report(tmp_path)
    with pytest.raises(SystemExit, match="error: " + re.escape(str(tmp_path))):
        report.main(["--run", str(tmp_path)])
    assert not (tmp_path / "report").exists()


def test_each_missing_input_is_named_with_its_reason(run_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: no such run folder"):
        write_report(tmp_path / "nowhere")
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        write_report(tmp_path / "plain")
    (tmp_path / "no_validation").mkdir()
    (tmp_path / "no_validation" / "config.json").write_text('{"val_ratio": 0}')
    with pytest.raises(FileNotFoundError, match=r"without validation \(--val_ratio 0\) has none"):
        write_report(tmp_path / "no_validation")
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "metrics.csv").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{copy / 'metrics.csv'}: not found")):
        write_report(copy)
    (copy / "valid_probs.csv").unlink()
    with pytest.raises(FileNotFoundError, match="not yet, or the file was deleted"):
        write_report(copy)
    (copy / "pseudo").mkdir()
    (copy / "pseudo" / "summary.json").write_text("{}")  # a stage folder: no config.json, no validation
    with pytest.raises(FileNotFoundError, match=f"its pseudo/ model trains on every person.*--run {re.escape(str(copy))}$"):
        write_report(copy / "pseudo")


@pytest.mark.parametrize("name, damage, message", [
    ("valid_probs.csv", lambda text: "", "cannot parse CSV"),
    ("valid_probs.csv", lambda text: text[:len(text) // 2], r"line \d+: \d+ fields, but the header has 21"),
    ("metrics.csv", lambda text: text.replace("valid_f1", "f1"), r"missing column\(s\) \['valid_f1'\]"),
])
def test_a_damaged_table_is_named_in_one_line(run_dir, name, damage, message):
    path = run_dir / name
    path.write_text(damage(path.read_text()))
    with pytest.raises(SystemExit, match=f"error: {re.escape(str(path))}: {message}"):
        report.main(["--run", str(run_dir)])


def test_unfinished_run_and_missing_folds_are_refused_by_name(run_dir, tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run_dir, unfinished, ignore=shutil.ignore_patterns("report"))
    (unfinished / "summary.json").unlink()
    with pytest.raises(SystemExit, match=re.escape(f"error: {unfinished} is an unfinished run (no summary.json)")):
        report.main(["--run", str(unfinished)])

    kfold = tmp_path / "kfold"  # val_ratio 0.2: 5 folds, fold4 never started
    (kfold / "fold0").mkdir(parents=True)
    (kfold / "config.json").write_text('{"fold": "all", "val_ratio": 0.2}')
    for k in range(4):
        shutil.copytree(run_dir, kfold / f"fold{k}", ignore=shutil.ignore_patterns("report"), dirs_exist_ok=True)
    with pytest.raises(SystemExit, match=r"\(fold4 not finished\)"):
        write_report(kfold)
    shutil.copytree(run_dir, kfold / "fold4", ignore=shutil.ignore_patterns("report"))
    (kfold / "fold2" / "valid_probs.csv").unlink()
    with pytest.raises(SystemExit, match=re.escape(f"error: {kfold}: no valid_probs.csv in the finished fold(s) fold2")):
        report.main(["--run", str(kfold)])
    assert not [*unfinished.rglob("report"), *kfold.rglob("report")]  # refused before any picture
