"""Shared fixtures: a tiny dataset in the competition layout, made by the project itself, and a
training config small enough to run in seconds on a CPU."""
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from config import default_config  # noqa: E402
from make_sample_data import make_sample_dataset  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The tests' tiny models gain nothing from intra-op threads, and on a busy CPU the threads'
    spin-waiting made runs up to 10x slower; the previous setting comes back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory):
    """18 training people (3 of each gender x age band), 6 eval people, 48x64 images."""
    return make_sample_dataset(tmp_path_factory.mktemp("sample"), n_train_people=18, n_eval_people=6,
                               size=(48, 64), seed=0)


@pytest.fixture
def train_cfg(sample_dir, tmp_path):
    """A fast training config: the starter code's small CNN, 32x24 images, one epoch, no workers."""
    cfg = default_config("train")
    cfg.update(data_dir=str(sample_dir / "train"), model="basemodel", pretrained=False, resize=[32, 24],
               epochs=1, batch_size=16, valid_batch_size=32, num_workers=0, cache_dir=str(tmp_path / "cache"),
               model_dir=str(tmp_path / "runs"), val_ratio=0.34, log_interval=1000)
    return cfg


@pytest.fixture
def inference_cfg(tmp_path):
    cfg = default_config("inference")
    cfg.update(num_workers=0, cache_dir=str(tmp_path / "cache"), tta="none")
    return cfg


def training_images_logged(run_dir, out_dir=None):
    """(images, people, images of label CSVs) from the 'N training images (P people[, M images of
    label CSVs])' line of train.log."""
    text = (Path(run_dir) / "train.log").read_text()
    prefix = re.escape(str(out_dir or run_dir)) + ": "
    found = re.findall(prefix + r"(\d+) training images \((\d+) people(?:, (\d+) images of label CSVs)?\)", text)
    assert found, f"no training-images line for {out_dir or run_dir} in train.log"
    return tuple(int(v or 0) for v in found[-1])
