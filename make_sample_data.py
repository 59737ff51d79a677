"""Write a small synthetic mask / gender / age dataset in the competition layout.

Usage:
    python make_sample_data.py --out data/sample --train_people 60 --eval_people 20 --size 96x128 --seed 0

Layout written under OUT (same seed -> byte-identical files):
    OUT/train/train.csv                    id,gender,race,age,path
    OUT/train/images/{id}_{gender}_Asian_{age}/mask1..mask5, incorrect_mask, normal (.jpg)
    OUT/eval/images/<sha1 hex>.jpg         all 7 images of each eval person (people disjoint from train)
    OUT/eval/info.csv                      ImageID,ans (ans = 0, shuffled order, as shipped)
    OUT/eval/answers.csv                   ImageID,ans (true class, same order as info.csv)
    OUT/build_info.json                    arguments and per-class counts

class = mask * 6 + gender * 3 + age_band. The faces are drawn so the labels are visible:
mask (5 worn styles / half-worn / none), gender (long hair to the shoulders vs short cap)
and age (hair greys with age, forehead wrinkles: 0 below 30, 1-2 for 30-59, 3-4 from 60).
"""
import argparse
import csv
import hashlib
import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

FILES = [("mask1", 0), ("mask2", 0), ("mask3", 0), ("mask4", 0), ("mask5", 0),
         ("incorrect_mask", 1), ("normal", 2)]
AGE_RANGES = [(18, 29), (30, 59), (60, 75)]
BOUNDARY_AGES = [(29,), (30, 59), (60,)]
MASK_COLOURS = [(240, 240, 240), (150, 200, 235), (25, 25, 30), (215, 190, 150), (235, 150, 170)]
SUPERSAMPLE = 2


def age_band(age):
    return 0 if age < 30 else (1 if age < 60 else 2)


def _mix(a, b, t):
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))


def _make_people(n, seed, split):
    """Cycle through the 6 gender x age-band combinations (shuffled per block of 6)."""
    split_rng = np.random.default_rng([seed, split])
    people = []
    for i in range(n):
        block, pos = divmod(i, 6)
        if pos == 0:
            combos = split_rng.permutation(6)
        gender, band = divmod(int(combos[pos]), 3)
        rng = np.random.default_rng([seed, split, i, 1])
        lo, hi = AGE_RANGES[band]
        bounds = BOUNDARY_AGES[band]
        age = bounds[(block // 3) % len(bounds)] if block % 3 == 0 else int(rng.integers(lo, hi + 1))
        if band == 0:
            hair = _mix((25, 22, 20), (95, 60, 32), rng.uniform())
        elif band == 1:
            hair = _mix((85, 62, 45), (160, 155, 150), 0.3 + 0.4 * (age - 30) / 29)
        else:
            hair = (min(240, 190 + 3 * (age - 60)),) * 3
        people.append(dict(gender=gender, age=age, band=band, hair=hair,
                           skin=_mix((245, 218, 192), (175, 125, 95), rng.uniform()),
                           shirt=tuple(int(c) for c in rng.integers(20, 230, 3))))
    return people


def _lower_face(cx, cy, rx, ry, top):
    """Polygon of the face ellipse (slightly enlarged) below y = cy + top * ry."""
    a0 = math.asin(max(-1.0, min(1.0, top / 1.03)))
    angles = np.linspace(a0, math.pi - a0, 40)
    return [(cx + 1.03 * rx * math.cos(a), cy + 1.03 * ry * math.sin(a)) for a in angles]


def _draw_mask(img, poly, style, top_y):
    """Paste a mask in `style` (0..4) through polygon `poly` onto `img`."""
    w, h = img.size
    colour = MASK_COLOURS[style]
    layer = Image.new("RGB", img.size, colour)
    d = ImageDraw.Draw(layer)
    dark = _mix(colour, (0, 0, 0), 0.45)
    if style == 3:  # beige with a horizontal fold line
        y = (top_y + max(p[1] for p in poly)) / 2
        d.line([(0, y), (w, y)], fill=dark, width=3 * SUPERSAMPLE)
    elif style == 4:  # dots
        step, r = 8 * SUPERSAMPLE, 1.5 * SUPERSAMPLE
        for y in range(0, h, step):
            for x in range((y // step % 2) * step // 2, w, step):
                d.ellipse([x - r, y - r, x + r, y + r], fill=(150, 30, 70))
    stencil = Image.new("L", img.size, 0)
    ImageDraw.Draw(stencil).polygon(poly, fill=255)
    img.paste(layer, (0, 0), stencil)
    ImageDraw.Draw(img).polygon(poly, outline=dark, width=SUPERSAMPLE)


def draw_face(person, mask, style, size, rng):
    """Draw one portrait; mask 0 worn (style 0..4), 1 incorrect, 2 none."""
    w, h = size[0] * SUPERSAMPLE, size[1] * SUPERSAMPLE
    img = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(20, 190, 3)))
    d = ImageDraw.Draw(img)
    s = rng.uniform(0.96, 1.04)
    cx, cy = w * (0.5 + rng.uniform(-0.03, 0.03)), h * (0.42 + rng.uniform(-0.02, 0.02))
    rx, ry = 0.30 * w * s, 0.27 * h * s
    skin, hair, lw = person["skin"], person["hair"], SUPERSAMPLE
    d.ellipse([cx - 0.55 * w, cy + 0.95 * ry, cx + 0.55 * w, cy + 0.95 * ry + 0.6 * h], fill=person["shirt"])
    if person["gender"] == 1:  # long hair framing the face down to the shoulders
        d.rounded_rectangle([cx - 1.3 * rx, cy - 1.0 * ry, cx + 1.3 * rx, 0.92 * h], radius=0.6 * rx, fill=hair)
    d.rectangle([cx - 0.35 * rx, cy + 0.6 * ry, cx + 0.35 * rx, cy + 1.2 * ry], fill=_mix(skin, (0, 0, 0), 0.1))
    d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=skin)
    d.chord([cx - 1.08 * rx, cy - 1.18 * ry, cx + 1.08 * rx, cy - 0.1 * ry], 180, 360, fill=hair)
    age = person["age"]
    n_wrinkles = [0, 1 + (age >= 45), 3 + (age >= 68)][person["band"]]
    wrinkle = _mix(skin, (40, 20, 10), min(0.85, 0.6 + 0.01 * (age - 30)))
    for j in range(n_wrinkles):
        y = cy - (0.30 + 0.08 * j) * ry
        d.line([(cx - 0.45 * rx, y), (cx + 0.45 * rx, y)], fill=wrinkle, width=lw)
    for ex in (cx - 0.38 * rx, cx + 0.38 * rx):
        d.ellipse([ex - 0.14 * rx, cy - 0.19 * ry, ex + 0.14 * rx, cy - 0.05 * ry], fill=(250, 250, 250))
        d.ellipse([ex - 0.06 * rx, cy - 0.17 * ry, ex + 0.06 * rx, cy - 0.07 * ry], fill=(30, 25, 20))
    d.polygon([(cx, cy), (cx - 0.09 * rx, cy + 0.22 * ry), (cx + 0.09 * rx, cy + 0.22 * ry)],
              fill=_mix(skin, (0, 0, 0), 0.25))
    d.ellipse([cx - 0.25 * rx, cy + 0.44 * ry, cx + 0.25 * rx, cy + 0.56 * ry], fill=(170, 55, 60))
    if mask < 2:
        top = -0.03 if mask == 0 else (0.30 if rng.uniform() < 0.6 else 0.64)
        _draw_mask(img, _lower_face(cx, cy, rx, ry, top), style, cy + top * ry)
    img = img.resize(size, Image.BOX)
    arr = np.asarray(img, dtype=np.float32) * rng.uniform(0.85, 1.15) * rng.uniform(0.95, 1.05, 3)
    arr += rng.normal(0.0, rng.uniform(2.0, 7.0), arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _save(img, path):
    if path.suffix.lower() == ".png":
        img.save(path, format="PNG")
    else:
        img.save(path, format="JPEG", quality=90)


def _person_images(person, seed, split, index, size):
    """Yield (file stem, class, image) for the 7 images of one person."""
    for k, (stem, mask) in enumerate(FILES):
        rng = np.random.default_rng([seed, split, index, 2, k])
        style = k if mask == 0 else int(rng.integers(5))
        label = mask * 6 + person["gender"] * 3 + person["band"]
        yield stem, label, draw_face(person, mask, style, size, rng)


def make_sample_dataset(out_dir, n_train_people=60, n_eval_people=20, size=(96, 128), seed=0, image_ext=".jpg"):
    """Write the dataset; size is (width, height); returns Path(out_dir).

    An earlier sample's out_dir/train and out_dir/eval are removed first; a folder holding other
    data there (real data, say) is refused, never deleted. build_info.json (its arguments) is
    written before any image, so the output of an interrupted or failed run is recognised as a
    sample and replaced too; its counts are added at the end. image_ext applies to train images only.
    """
    out = Path(out_dir)
    size = (int(size[0]), int(size[1]))
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: {out} is a file, not a folder; choose another --out")
    if any((out / sub).exists() for sub in ("train", "eval")) and not _is_sample(out):
        raise SystemExit(f"error: {out} already holds train/ or eval/ that make_sample_data.py did not write "
                         "(no build_info.json of a sample); choose another --out")
    info = {"args": {"out_dir": str(out), "n_train_people": n_train_people, "n_eval_people": n_eval_people,
                     "size": list(size), "seed": seed, "image_ext": image_ext}}
    out.mkdir(parents=True, exist_ok=True)
    _write_info(out, info)
    for sub in ("train", "eval"):
        shutil.rmtree(out / sub, ignore_errors=True)
    (out / "train" / "images").mkdir(parents=True)
    (out / "eval" / "images").mkdir(parents=True)

    train_counts, rows = [0] * 18, []
    for i, person in enumerate(_make_people(n_train_people, seed, 0)):
        gender = ("male", "female")[person["gender"]]
        pid = f"{i + 1:06d}"
        folder = f"{pid}_{gender}_Asian_{person['age']}"
        rows.append([pid, gender, "Asian", person["age"], folder])
        (out / "train" / "images" / folder).mkdir()
        for stem, label, img in _person_images(person, seed, 0, i, size):
            _save(img, out / "train" / "images" / folder / f"{stem}{image_ext}")
            train_counts[label] += 1
    with open(out / "train" / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([["id", "gender", "race", "age", "path"]] + rows)

    eval_counts, answers = [0] * 18, []
    for j, person in enumerate(_make_people(n_eval_people, seed, 1)):
        for stem, label, img in _person_images(person, seed, 1, j, size):
            name = hashlib.sha1(f"{seed}/eval-{j}/{stem}".encode()).hexdigest() + ".jpg"
            _save(img, out / "eval" / "images" / name)
            answers.append((name, label))
            eval_counts[label] += 1
    random.Random(seed).shuffle(answers)
    for fname, with_answer in (("info.csv", False), ("answers.csv", True)):
        with open(out / "eval" / fname, "w", newline="") as f:
            csv.writer(f).writerows([["ImageID", "ans"]] + [[n, a if with_answer else 0] for n, a in answers])

    info.update(train={"people": n_train_people, "images": sum(train_counts), "class_counts": train_counts},
                eval={"people": n_eval_people, "images": sum(eval_counts), "class_counts": eval_counts})
    _write_info(out, info)
    return out


def _write_info(out, info):
    """build_info.json written whole or not at all: a cut-off one would leave the sample unrecognised."""
    tmp = out / "build_info.json.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(out / "build_info.json")


def _is_sample(out):
    """out holds a dataset this script wrote (its build_info.json names n_train_people)."""
    try:
        return "n_train_people" in json.loads((out / "build_info.json").read_text())["args"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _parse_size(text):
    w, h = text.lower().split("x")
    return int(w), int(h)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--out", default="data/sample")
    p.add_argument("--train_people", type=int, default=60)
    p.add_argument("--eval_people", type=int, default=20)
    p.add_argument("--size", type=_parse_size, default=(96, 128), help="WxH, e.g. 96x128")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.train_people < 1 or a.eval_people < 0:  # no eval people is a training-only sample
        p.error(f"--train_people must be at least 1 and --eval_people at least 0, got {a.train_people} and "
                f"{a.eval_people}")
    if min(a.size) < 1:
        p.error(f"--size must be at least 1x1, got {a.size[0]}x{a.size[1]}")
    if a.seed < 0:
        p.error(f"--seed must be at least 0, got {a.seed}")
    out = make_sample_dataset(a.out, a.train_people, a.eval_people, a.size, a.seed)
    print(f"wrote {out}: train {a.train_people} people / {a.train_people * 7} images, "
          f"eval {a.eval_people} people / {a.eval_people * 7} images")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("interrupted; run the same command again to write the sample afresh")
