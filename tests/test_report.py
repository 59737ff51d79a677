"""report.py: every picture of a trained run is a readable PNG whose size follows its content,
Grad-CAM is a heat map of the predicted class, a k-fold run gets one report per fold, and a folder
without validation is refused by name."""
import re
import shutil

import pytest
import torch
from PIL import Image

import report
import train
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
