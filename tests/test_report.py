"""report.py: every picture of a trained run is a readable PNG whose size follows its content,
Grad-CAM is a heat map of the predicted class, a k-fold run gets one report per fold, and a folder
without validation is refused by name."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import train
from dataset import NUM_CLASSES
from inference import load_model
from model import class_probabilities, create_model
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


def test_grad_cam_follows_the_backbone_gradient(run_dir):
    """With the features of a 1 x 1 map the CAM is relu(sum of features * gradients): compare
    with a hand-made computation on a trained model."""
    model, _ = load_model(run_dir / "best.pt", "cpu")
    images = torch.randn(2, 3, 32, 24)
    cams, probs = grad_cam(model, images, (4, 3))
    features = model.backbone(images).detach().requires_grad_()
    out = {name: head(torch.nn.functional.adaptive_avg_pool2d(features, 1).flatten(1)) for name, head in model.heads.items()}
    p = class_probabilities(out)
    p[torch.arange(2), p.argmax(1)].log().sum().backward()
    expected = torch.relu((features.grad.mean((2, 3), keepdim=True) * features).sum(1, keepdim=True)).detach()
    expected = torch.nn.functional.interpolate(expected, size=(4, 3), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(cams, expected / expected.amax((1, 2), keepdim=True))
