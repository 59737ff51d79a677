"""Turn a folder of face photos with known age and gender into extra training people in the
competition layout: `normal` is the photo, mask1..mask5 wear five different mask styles and
incorrect_mask wears one below the nose or on the chin, all drawn from the 5 landmarks MTCNN
finds (detect_faces.py). External face datasets have no masks, so without this their people
could only ever teach the "not wearing" classes; with it they fill the rare classes (60+) of
all three mask states.

    python mask_faces.py --faces_dir UTKFace/ --masked_out data/external      # UTKFace names
    python mask_faces.py --faces_dir photos/ --faces_csv photos.csv --masked_out data/external
    python train.py --extra_data data/external/train

Labels come from --faces_csv (file,age,gender[,race]; gender male/female or 0/1) or, without
it, from UTKFace's file names `{age}_{gender 0 male, 1 female}_{race 0-4}_*.jpg`. Photos whose
label cannot be read or whose face is not found are listed in <masked_out>/skipped.csv. Each
photo is framed into a portrait like the competition's (masked_frame), and each person's
drawing depends only on --seed and the file name, so the output is reproducible.
"""
import hashlib
import json
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw, ImageFilter

from config import parse_config
from dataset import AGES, GENDERS, IMAGE_EXTENSIONS, MASK_FILES, DataError, numbered_rows, read_csv, read_rgb, whole_age
from detect_faces import FaceDetector
from train import resolve_device, setup_logging, write_csv_atomic, write_text_atomic

log = logging.getLogger("mask")
UTKFACE_RACES = ("White", "Black", "Asian", "Indian", "Others")
WORN_STYLES = ("surgical_white", "surgical_blue", "cloth", "kf94", "patterned")
INCORRECT_STYLES = ("surgical_white", "surgical_blue", "cloth", "kf94")


# ---------------------------------------------------------------------------------------------
# Labels
def read_labels(faces_dir, faces_csv=""):
    """(table file, age, gender 0/1, race; skipped (file, reason) list). Labels from faces_csv,
    or parsed from UTKFace file names when faces_csv is empty."""
    faces_dir = Path(faces_dir)
    if not faces_dir.is_dir():
        raise DataError(f"{faces_dir}: folder not found")
    rows, skipped = [], []
    if faces_csv:
        table = read_csv(faces_csv, ["file", "age", "gender"])
        for line, rec in numbered_rows(table):
            gender = GENDERS.get(rec.gender.lower(), {"0": 0, "1": 1}.get(rec.gender))
            if not rec.age.isdigit() or gender is None:
                raise DataError(f"{faces_csv}: line {line}: age '{rec.age}' / gender '{rec.gender}' "
                                "should be a whole number / male, female, 0 or 1")
            if whole_age(rec.age) is None:
                raise DataError(f"{faces_csv}: line {line}: age {rec.age} is not between {AGES[0]} and {AGES[-1]}")
            if not (faces_dir / rec.file).is_file():
                raise DataError(f"{faces_csv}: line {line}: {faces_dir / rec.file} not found")
            race = re.sub(r"[\W_]+", "-", getattr(rec, "race", "") or "Unknown")  # "_" splits the folder name
            rows.append((rec.file, int(rec.age), gender, race))
        lines = [line for line, repeated in zip(table.attrs["lines"], table["file"].duplicated(keep=False)) if repeated]
        if len(lines):
            raise DataError(f"{faces_csv}: lines {', '.join(map(str, lines))}: the same file more than once")
    else:
        for path in sorted(faces_dir.iterdir()):
            if path.name.startswith(".") or not path.name.lower().endswith(tuple(IMAGE_EXTENSIONS)):
                continue
            parts = path.name.split("_")
            if len(parts) < 4 or not (parts[0].isdigit() and parts[1] in ("0", "1") and parts[2] in ("0", "1", "2", "3", "4")):
                skipped.append((path.name, "name is not {age}_{gender}_{race}_*"))
                continue
            if whole_age(parts[0]) is None:
                skipped.append((path.name, f"age {int(parts[0])} is not between {AGES[0]} and {AGES[-1]}"))
                continue
            rows.append((path.name, int(parts[0]), int(parts[1]), UTKFACE_RACES[int(parts[2])]))
    if not rows:
        raise DataError(f"{faces_dir}: no labelled face photos found")
    return pd.DataFrame(rows, columns=["file", "age", "gender", "race"]), skipped


# ---------------------------------------------------------------------------------------------
# Framing and drawing
def frame_photo(photo, frame, face_width, rng):
    """Place a tight face photo in a portrait frame (h, w): scaled to face_width of the frame's
    width (+-5%), centred a little above the middle, on its own border stretched and blurred.
    Returns the framed image and the map (scale, dx, dy) from photo to frame coordinates."""
    fh, fw = frame
    scale = fw * face_width * rng.uniform(0.95, 1.05) / photo.width
    size = (round(photo.width * scale), round(photo.height * scale))
    dx, dy = (fw - size[0]) / 2 + rng.uniform(-0.02, 0.02) * fw, fh * 0.42 - size[1] / 2
    canvas = photo.resize((fw, fh), Image.BILINEAR).filter(ImageFilter.GaussianBlur(fw / 12))
    feather = Image.new("L", size, 0)
    ImageDraw.Draw(feather).rectangle([size[0] * 0.04, size[1] * 0.04, size[0] * 0.96, size[1] * 0.96], fill=255)
    canvas.paste(photo.resize(size, Image.BILINEAR), (round(dx), round(dy)),
                 feather.filter(ImageFilter.GaussianBlur(size[0] * 0.03)))
    return canvas, (scale, round(dx), round(dy))


def face_frame(landmarks):
    """Origin between the eyes, unit vectors across (left to right eye) and down the face, the
    eye distance and the eye-to-mouth distance, from 5 landmarks (eyes, nose, mouth corners)."""
    left_eye, right_eye, _, mouth_left, mouth_right = landmarks
    eyes, mouth = (left_eye + right_eye) / 2, (mouth_left + mouth_right) / 2
    across = (right_eye - left_eye) / np.linalg.norm(right_eye - left_eye)
    down = np.array([-across[1], across[0]])
    if np.dot(down, mouth - eyes) < 0:
        down = -down
    return eyes, across, down, np.linalg.norm(right_eye - left_eye), np.dot(mouth - eyes, down)


def face_point(frame, x, y):
    """Image coordinates of a point given in face units: x eye distances across, y eye-to-mouth
    distances down from between the eyes."""
    origin, across, down, eye_dist, eye_mouth = frame
    return tuple(float(v) for v in origin + x * eye_dist * across + y * eye_mouth * down)


def mask_outline(frame, style, top, rng):
    """The mask's outline in image coordinates, from the upper edge `top` (face units: about 0.3
    over the nose bridge; 0.8 under the nose; 1.2 on the chin) to below the chin."""
    bottom = max(2.05 if style == "patterned" else 1.75, top + 0.8)
    wide = 1.25 if style == "kf94" else 1.1
    right = [(x, top + f * (bottom - top)) for x, f in zip((1.0, wide, 0.95 * wide, 0.6, 0.0), (0, 0.3, 0.6, 0.85, 1))]
    points = [(0.0, top - 0.08)] + right + [(-x, y) for x, y in reversed(right[:-1])]
    jitter = rng.normal(0, 0.015, size=(len(points), 2))
    return [face_point(frame, x + jx, y + jy) for (x, y), (jx, jy) in zip(points, jitter)]


STYLE_COLOURS = {
    "surgical_white": [(236, 238, 240), (225, 228, 226)],
    "surgical_blue": [(150, 196, 228), (170, 215, 205), (232, 190, 200)],
    "cloth": [(32, 32, 36), (40, 48, 78), (120, 122, 126), (196, 180, 150)],
    "kf94": [(240, 240, 240), (30, 30, 32), (205, 190, 165)],
    "patterned": [(180, 40, 50), (40, 90, 150), (60, 120, 70), (210, 160, 60)],
}


def draw_mask(image, landmarks, style, top, rng):
    """Draw one mask of a style on a copy of image: a shaded filled outline with the style's
    pleats, seam, fold or pattern, ear loops and a soft edge."""
    frame = face_frame(landmarks)
    origin, across, _, eye_dist, _ = frame
    colours = STYLE_COLOURS[style]
    colour = np.array(colours[rng.integers(len(colours))]) * rng.uniform(0.9, 1.05)
    outline = mask_outline(frame, style, top, rng)
    layer = Image.new("RGB", image.size, tuple(int(c) for c in np.clip(colour, 0, 255)))
    draw = ImageDraw.Draw(layer)
    line_colour = tuple(int(c) for c in np.clip(colour * 0.78, 0, 255))
    width = max(1, round(eye_dist / 30))

    def at(x, y):
        return face_point(frame, x, y)

    if style.startswith("surgical"):  # three horizontal pleats
        for y in np.linspace(top, 1.75, 5)[1:4]:
            draw.line([at(-1.2, y), at(1.2, y + 0.05)], fill=line_colour, width=width)
    elif style == "cloth":  # centre seam
        draw.line([at(0, top - 0.1), at(0, 1.9)], fill=line_colour, width=width)
    elif style == "kf94":  # horizontal fold
        draw.line([at(-1.3, 1.0), at(1.3, 1.0)], fill=line_colour, width=width)
    else:  # dots of a second colour
        dot = tuple(int(c) for c in rng.integers(150, 256, 3))
        r = eye_dist / 14
        for x in np.arange(-1.4, 1.5, 0.35):
            for y in np.arange(top, 2.2, 0.3):
                cx, cy = at(x + 0.17 * (round(y / 0.3) % 2), y)
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=dot)
    # cylindrical shading: darker towards the sides of the face
    xs = np.arange(image.width) - origin[0]
    ys = np.arange(image.height) - origin[1]
    side = np.abs(xs[None, :] * across[0] + ys[:, None] * across[1]) / (1.3 * eye_dist)
    shade = 1.0 - 0.28 * np.clip(side, 0, 1) ** 2
    layer = Image.fromarray((np.asarray(layer, np.float32) * shade[..., None]).astype(np.uint8))
    alpha = Image.new("L", image.size, 0)
    ImageDraw.Draw(alpha).polygon(outline, fill=255)
    out = image.copy()
    loops = ImageDraw.Draw(out)
    for sign in (-1, 1):  # ear loops from the mask's upper and lower corners towards the ears
        ear = at(sign * 1.35, 0.45)
        for y in (top + 0.1, 1.4):
            loops.line([at(sign * 1.05, y), ear], fill=(225, 225, 225) if style != "cloth" else line_colour, width=width)
    out.paste(layer, (0, 0), alpha.filter(ImageFilter.GaussianBlur(float(max(0.6, eye_dist / 60)))))
    return out


def person_images(photo, landmarks, rng):
    """The 7 images of one person: {name: image}; five worn styles in random order, one
    incorrect (60% under the nose, 40% on the chin), and the photo itself."""
    images = {f"mask{k + 1}": draw_mask(photo, landmarks, style, rng.uniform(0.3, 0.42), rng)
              for k, style in enumerate(rng.permutation(WORN_STYLES))}
    top = rng.uniform(0.72, 0.85) if rng.random() < 0.6 else rng.uniform(1.15, 1.3)
    images["incorrect_mask"] = draw_mask(photo, landmarks, INCORRECT_STYLES[rng.integers(len(INCORRECT_STYLES))], top, rng)
    images["normal"] = photo
    return images


# ---------------------------------------------------------------------------------------------
ARGUMENTS_JSON = "arguments.json"


def check_same_arguments(path, arguments):
    """Record the arguments the people depend on at a run's start; a continuation with other
    ones would mix people made both ways in one dataset."""
    if not path.exists():
        write_text_atomic(json.dumps(arguments, indent=2), path)
        return
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})")
    differ = [f"--{key} {saved.get(key)} (now {value})" if key != "labels" else "the photos, their labels or order"
              for key, value in arguments.items() if saved.get(key) != value]
    if differ:
        raise DataError(f"{path}: this output was started with other arguments ({'; '.join(differ)}); "
                        "rerun with the earlier ones or choose another --masked_out")


def write_people(table, faces_dir, out_dir, detector, frame, face_width, seed):
    """Detect, frame and draw every photo of table; write out_dir/train/images/<person>/*.jpg
    and out_dir/train/train.csv. Returns the (file, reason) list of photos skipped (unreadable,
    no face found). A person whose 7 images are already there (an interrupted run, rerun with
    the same arguments) is kept, not redrawn: the drawing depends only on the seed and file."""
    train_dir = Path(out_dir) / "train"
    (train_dir / "images").mkdir(parents=True, exist_ok=True)
    check_same_arguments(Path(out_dir) / ARGUMENTS_JSON, {
        "faces_dir": str(Path(faces_dir).resolve()), "masked_frame": [int(v) for v in frame],
        "masked_face_width": face_width, "seed": seed,
        "labels": hashlib.sha1(table.to_csv(index=False).encode()).hexdigest()})
    people, skipped, kept = [], [], 0
    for k, rec in enumerate(table.itertuples(index=False), start=1):
        gender = "female" if rec.gender else "male"
        person = f"{k:06d}_{gender}_{rec.race}_{rec.age}"
        folder = train_dir / "images" / person
        row = {"id": f"{k:06d}", "gender": gender, "race": rec.race, "age": rec.age, "path": person}
        if all((folder / f"{name}.jpg").is_file() for name in MASK_FILES):
            people.append(row)
            kept += 1
            continue
        try:
            photo = read_rgb(Path(faces_dir) / rec.file)
        except DataError as e:
            skipped.append((rec.file, str(e)))
            continue
        face = detector([np.asarray(photo)])[0]
        if face is None:
            skipped.append((rec.file, "no face found"))
            continue
        rng = np.random.default_rng([seed, int(hashlib.sha1(rec.file.encode()).hexdigest()[:8], 16)])
        landmarks = face[2]
        if frame[0] and frame[1]:
            photo, (scale, dx, dy) = frame_photo(photo, frame, face_width, rng)
            landmarks = landmarks * scale + np.array([dx, dy])
        folder.mkdir(exist_ok=True)
        for name, image in person_images(photo, landmarks, rng).items():
            partial = folder / f".{name}.jpg.partial"  # renamed when complete: an interrupted save is redrawn
            image.save(partial, format="JPEG", quality=92)
            partial.replace(folder / f"{name}.jpg")
        people.append(row)
        if k % 100 == 0:
            log.info("%d of %d photos", k, len(table))
    if kept:
        log.info("kept %d people already written by an earlier, interrupted run", kept)
    write_csv_atomic(pd.DataFrame(people, columns=["id", "gender", "race", "age", "path"]), train_dir / "train.csv")
    return skipped


def main(argv=None):
    cfg = parse_config("masks", argv, description=__doc__)
    setup_logging()
    if not cfg["faces_dir"] or not cfg["masked_out"]:
        raise SystemExit("error: --faces_dir and --masked_out are required")
    frame = cfg["masked_frame"]
    if frame != [0, 0] and min(frame) < 1:
        raise SystemExit(f"error: --masked_frame must be a height and width of at least 1, or 0 0 to keep the "
                         f"photo as it is, got {' '.join(map(str, frame))}")
    if cfg["seed"] < 0:
        raise SystemExit(f"error: --seed must be at least 0, got {cfg['seed']}")
    if not cfg["masked_face_width"] > 0:
        raise SystemExit(f"error: --masked_face_width must be above 0, got {cfg['masked_face_width']}")
    if (Path(cfg["masked_out"]) / "train" / "train.csv").exists():
        raise SystemExit(f"error: {cfg['masked_out']} already holds a dataset; choose another --masked_out")
    try:
        table, skipped = read_labels(cfg["faces_dir"], cfg["faces_csv"])
        detector = FaceDetector(resolve_device(cfg["device"]))
        not_drawn = write_people(table, cfg["faces_dir"], cfg["masked_out"], detector, cfg["masked_frame"],
                                 cfg["masked_face_width"], cfg["seed"])
    except DataError as e:
        raise SystemExit(f"error: {e}")
    log.info("wrote %d people to %s", len(table) - len(not_drawn), Path(cfg["masked_out"]) / "train")
    skipped += not_drawn
    if skipped:
        write_csv_atomic(pd.DataFrame(skipped, columns=["file", "reason"]), Path(cfg["masked_out"]) / "skipped.csv")
        log.warning("skipped %d photo(s), listed in %s", len(skipped), Path(cfg["masked_out"]) / "skipped.csv")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("interrupted; the same command continues, keeping the people already written")
