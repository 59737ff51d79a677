"""Find the face in every image of a dataset once and write its box and 5 landmarks to
<folder>/faces.csv, which `train.py --face_crop` (and the mask drawing of mask_faces.py) reads.

    python detect_faces.py                                   # train/ and eval/ of --data_dir
    python detect_faces.py --face_dirs data/train data/eval  # any folders holding images/

The detector is MTCNN from facenet-pytorch: its weights ship inside the wheel (it works
offline), it is plain PyTorch (batched on the same CUDA device as training, no other runtime),
and it gives the 5 landmarks a mask is drawn from (eyes, nose, mouth corners). mediapipe's
detector is reported to be much faster on a CPU (~1 ms an image against MTCNN's ~27 ms measured
here) but needs OpenCV (without it `import mediapipe` fails), a protobuf pin and mediapipe 0.10.14
exactly. facenet-pytorch pins torch<2.3, so `make install` installs it
with --no-deps (requirements-nodeps.txt). Faces the first pass misses get a second pass with
lower detection thresholds; images still without a face get found=0 and are counted.
"""
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from config import parse_config
from dataset import (FACE_COLUMNS, FACES_CSV, FILE_BYTES, IMAGE_EXTENSIONS, LANDMARK_COLUMNS, DataError, read_rgb,
                     train_root)
from train import resolve_device, setup_logging, write_csv_atomic

log = logging.getLogger("mask")
FIRST_PASS, SECOND_PASS = (0.6, 0.7, 0.7), (0.4, 0.5, 0.5)  # MTCNN's three stage thresholds


class FaceDetector:
    """MTCNN with a second, more permissive pass for the faces the first one missed.
    Calling it on a list of same-sized RGB arrays returns, per image, None or
    (box x1 y1 x2 y2, score, 5 x 2 landmarks); the largest face when there are several."""

    def __init__(self, device):
        try:
            from facenet_pytorch import MTCNN
        except ImportError:
            raise SystemExit("error: face detection needs facenet-pytorch: "
                             "pip install --no-deps -r requirements-nodeps.txt (or make install)")
        self.passes = [MTCNN(thresholds=list(t), select_largest=True, device=device) for t in (FIRST_PASS, SECOND_PASS)]

    def __call__(self, images):
        found = [None] * len(images)
        if min(images[0].shape[:2]) < self.passes[0].min_face_size:  # MTCNN has no scale to search it at and fails
            return found
        for mtcnn in self.passes:
            todo = [i for i, f in enumerate(found) if f is None]
            if not todo:
                break
            boxes, scores, points = mtcnn.detect(np.stack([images[i] for i in todo]), landmarks=True)
            for i, box, score, point in zip(todo, boxes, scores, points):
                if box is not None:  # facenet-pytorch returns object arrays: one row per face, largest first
                    found[i] = (np.asarray(box[0], float), float(score[0]), np.asarray(point[0], float))
        return found


class _Images(Dataset):
    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return i, np.asarray(read_rgb(self.paths[i])), ""
        except DataError as e:
            return i, None, str(e)


def image_files(folder):
    """Every image under folder/images (or folder itself when it has no images/), sorted;
    hidden files such as macOS '._*' copies are left out. An error when there is none."""
    root = Path(folder) / "images" if (Path(folder) / "images").is_dir() else Path(folder)
    if not root.is_dir():
        raise DataError(f"{folder}: folder not found")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    if not paths:
        raise DataError(f"{folder}: no .jpg/.jpeg/.png images found")
    return paths


def face_row(folder, path, width, height, face):
    row = {"image": path.relative_to(folder).as_posix(), "width": width, "height": height,
           "found": int(face is not None), FILE_BYTES: path.stat().st_size}
    if face is not None:
        box, score, points = face
        row.update(score=round(score, 4), **dict(zip(("x1", "y1", "x2", "y2"), box.round(1))))
        row.update({column: round(float(v), 1) for column, v in zip(LANDMARK_COLUMNS, points.reshape(-1))})
    return row


def detect_folder(folder, detector, batch_size=32, num_workers=0, paths=None):
    """Detect the faces of every image under folder (paths: its image_files, when already
    listed); returns the faces.csv table (one row per image, paths relative to folder) and the
    read errors. Images of different sizes are detected in separate groups. An unreadable image
    gets a row without a face (found 0) and its error, so one bad file does not throw away the
    folder's detections; training still stops on it (or skips it with --skip_bad_images)."""
    folder = Path(folder)
    paths = image_files(folder) if paths is None else paths
    loader = DataLoader(_Images(paths), batch_size=batch_size, num_workers=num_workers, collate_fn=list)
    rows, errors = [None] * len(paths), []
    for batch in loader:
        by_size = {}
        for i, img, error in batch:
            if error:
                errors.append(error)
                rows[i] = face_row(folder, paths[i], None, None, None)
            else:
                by_size.setdefault(img.shape, []).append((i, img))
        for group in by_size.values():
            for (i, img), face in zip(group, detector([img for _, img in group])):
                rows[i] = face_row(folder, paths[i], img.shape[1], img.shape[0], face)
    table = pd.DataFrame(rows, columns=[*FACE_COLUMNS, FILE_BYTES])  # an unreadable image has no size: whole numbers kept
    return table.astype({"width": "Int64", "height": "Int64"}), errors


def default_folders(data_dir):
    """The train folder of data_dir and, when there is one, the eval folder beside it."""
    train = train_root(data_dir)
    if not (train / "train.csv").is_file():  # e.g. the dataset root: its faces.csv would be read by nothing
        raise DataError(f"{train}: no train.csv: --data_dir is the training folder (the one holding train.csv "
                        "and images/); --face_dirs takes any folders")
    if (train.parent / "eval").is_dir():
        return [train, train.parent / "eval"]
    log.info("no eval folder beside %s: detecting the training images only", train)
    return [train]


def main(argv=None):
    cfg = parse_config("detect", argv, description=__doc__)
    setup_logging()
    if cfg["detect_batch_size"] < 1:
        raise SystemExit(f"error: --detect_batch_size must be at least 1, got {cfg['detect_batch_size']}")
    written = []
    try:
        # an images/ folder stands for its parent, beside which training reads faces.csv
        folders = [train_root(folder) for folder in cfg["face_dirs"]] or default_folders(cfg["data_dir"])
        images = {folder: image_files(folder) for folder in folders}  # a bad folder stops the run before any detection
        for folder in folders:
            if (Path(folder) / FACES_CSV).exists():
                log.info("%s will be replaced", Path(folder) / FACES_CSV)
        detector = FaceDetector(resolve_device(cfg["device"]))
        for folder in folders:
            table, errors = detect_folder(folder, detector, cfg["detect_batch_size"], paths=images[folder])
            write_csv_atomic(table, Path(folder) / FACES_CSV)  # atomic: Ctrl-C leaves the old file whole
            written.append(str(Path(folder) / FACES_CSV))
            if errors:
                log.warning("%s: %d unreadable image(s) written without a face: %s", Path(folder) / FACES_CSV,
                            len(errors), "; ".join(errors[:5]) + (" ..." if len(errors) > 5 else ""))
            missed = table.loc[table["found"] == 0, "image"]
            log.info("%s: a face in %d of %d images (%s)%s", Path(folder) / FACES_CSV, len(table) - len(missed),
                     len(table), f"{(len(table) - len(missed)) / len(table):.2%}",
                     f"; none in {', '.join(missed[:5])}{' ...' if len(missed) > 5 else ''}" if len(missed) else "")
    except DataError as e:
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt:
        log.error("interrupted: %s", f"{', '.join(written)} written, every other faces.csv unchanged" if written
                  else "every faces.csv unchanged")
        raise SystemExit(130)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
