"""Pictures of a trained run for a person to look at, as PNGs in <run>/report/.

    python report.py --run runs/exp                        # runs/exp/report/*.png
    python report.py --run runs/kfold                      # k-fold run: runs/kfold/fold<k>/report/ per fold
    python report.py --run runs/exp --images_per_class 4   # more Grad-CAM images per class

    confusion_18.png       18 x 18 validation confusion matrix (rows true, columns predicted, counts in cells)
    confusion_mask.png     the same per task (also _gender, _age)
    curves.png             training losses and validation macro F1 (18 classes and per task) per epoch
    worst.png              the validation images with the lowest probability of their true class
    gradcam.png            Grad-CAM heat maps of the predicted class, images_per_class images per true class

Reads valid_probs.csv, metrics.csv and best.pt (image size, crop, normalization and age bands come
from the checkpoint's config); images are read at the paths valid_probs.csv holds, so run it from
the folder training ran in when data_dir was relative. Runs on the CPU in seconds.
"""
import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from sklearn.metrics import confusion_matrix

from dataset import (AGE_NAMES, GENDER_NAMES, MASK_NAMES, NUM_CLASSES, PROB_COLUMNS, DataError, build_transform,
                     class_name, crop_boxes, decode_class, decode_image, read_csv, read_valid_probs)
from inference import check_folds_finished, find_checkpoints, fold_dirs, load_model
from model import class_probabilities
from train import saved_config, write_atomic

TILE = 128  # image height in worst.png and gradcam.png
WORST = 16  # images in worst.png
FONT = ImageFont.load_default(13)
LINE = 17  # text line height
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


TASK_NAMES = {"mask": MASK_NAMES, "gender": GENDER_NAMES, "age": AGE_NAMES}  # validation holds the true classes


def short_label(c):
    """'4 W F 30-59': class number, mask and gender initials, age band (class_name is the long form)."""
    mask, gender, band = decode_class(int(c))
    return f"{c} {MASK_NAMES[mask][0].upper()} {GENDER_NAMES[gender][0].upper()} {AGE_NAMES[band]}"


# ---------------------------------------------------------------------------------------------
# Drawing helpers
def text_width(lines):
    return int(max(FONT.getlength(line) for line in lines))


def vertical_text(text):
    """The text on a white strip, turned to read bottom to top."""
    strip = Image.new("RGB", (text_width([text]) + 2, LINE), "white")
    ImageDraw.Draw(strip).text((0, 1), text, fill="black", font=FONT)
    return strip.rotate(90, expand=True)


def titled(image, lines):
    """The image below a header of text lines."""
    out = Image.new("RGB", (max(image.width, text_width(lines) + 16), image.height + LINE * len(lines) + 12), "white")
    ImageDraw.Draw(out).multiline_text((8, 6), "\n".join(lines), fill="black", font=FONT, spacing=4)
    out.paste(image, (0, LINE * len(lines) + 12))
    return out


def tile(image, lines):
    """An image with text lines under it."""
    out = Image.new("RGB", (max(image.width, text_width(lines)) + 12, image.height + LINE * len(lines) + 10), "white")
    out.paste(image, ((out.width - image.width) // 2, 4))
    ImageDraw.Draw(out).multiline_text((6, image.height + 6), "\n".join(lines), fill="black", font=FONT, spacing=4)
    return out


def grid(tiles, columns):
    """Tiles in rows of `columns` (None leaves its place empty)."""
    w, h = (max(t.size[k] for t in tiles if t is not None) for k in (0, 1))
    sheet = Image.new("RGB", (columns * w, -(-len(tiles) // columns) * h), "white")
    for k, t in enumerate(tiles):
        if t is not None:
            sheet.paste(t, ((k % columns) * w, (k // columns) * h))
    return sheet


def display_image(path, box, cfg):
    """The model's view of an image (same crop and aspect ratio), TILE pixels high."""
    h, w = cfg["resize"]
    return decode_image(path, (TILE, round(TILE * w / h)), box)


# ---------------------------------------------------------------------------------------------
# Pictures
def heatmap(matrix, labels, title):
    """Confusion matrix: counts in the cells, coloured by their share of the row (true class)."""
    n, cell = len(labels), max(34, 180 // len(labels))
    label_w = text_width(labels) + 10
    left, top = label_w + LINE + 8, label_w + LINE + 8
    img = Image.new("RGB", (left + n * cell + 8, top + n * cell + 8), "white")
    draw = ImageDraw.Draw(img)
    draw.text((left + (n * cell - text_width(["predicted"])) // 2, 2), "predicted", fill="black", font=FONT)
    true = vertical_text("true")
    img.paste(true, (2, top + (n * cell - true.height) // 2))
    share = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    for i, label in enumerate(labels):
        draw.text((LINE + 6, top + i * cell + (cell - LINE) // 2), label, fill="black", font=FONT)
        column = vertical_text(label)
        img.paste(column, (left + i * cell + (cell - column.width) // 2, top - 4 - column.height))
        for j in range(n):
            colour = tuple(int(255 + (dark - 255) * share[i, j]) for dark in (8, 48, 107))
            box = (left + j * cell, top + i * cell, left + (j + 1) * cell, top + (i + 1) * cell)
            draw.rectangle(box, fill=colour, outline=(200, 200, 200))
            draw.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), str(matrix[i, j]), anchor="mm", font=FONT,
                      fill="white" if share[i, j] > 0.5 else "black" if matrix[i, j] else (190, 190, 190))
    return titled(img, title)


def line_plot(series, title, y_range, best=None):
    """Lines with dots, {name: (epochs, values)}, on axes with ticks, the legend on the right;
    best: an epoch marked with a dashed vertical line."""
    left, top, pw, ph = 56, 10, 420, 260
    img = Image.new("RGB", (left + pw + 190, top + ph + 40), "white")
    draw = ImageDraw.Draw(img)
    epochs = np.concatenate([x for x, _ in series.values()])
    x0, x1 = epochs.min() - 0.5, epochs.max() + 0.5
    y0, y1 = y_range
    px = lambda x: left + (x - x0) / (x1 - x0) * pw  # noqa: E731
    py = lambda y: top + ph - (y - y0) / (y1 - y0) * ph  # noqa: E731
    for y in np.linspace(y0, y1, 5):
        draw.line((left, py(y), left + pw, py(y)), fill=(230, 230, 230))
        draw.text((left - 6, py(y)), f"{y:.2f}", fill="black", font=FONT, anchor="rm")
    for x in range(int(epochs.min()), int(epochs.max()) + 1, max(1, int(np.ceil(len(set(epochs)) / 10)))):
        draw.line((px(x), top + ph, px(x), top + ph + 4), fill="black")
        draw.text((px(x), top + ph + 6), str(x), fill="black", font=FONT, anchor="mt")
    draw.rectangle((left, top, left + pw, top + ph), outline="black")
    draw.text((left + pw / 2, top + ph + 22), "epoch", fill="black", font=FONT, anchor="mt")
    entries = [(name, COLOURS[k % len(COLOURS)]) for k, name in enumerate(series)]
    for (name, colour), (x, y) in zip(entries, series.values()):
        points = [(px(a), py(b)) for a, b in zip(x, y) if np.isfinite(b)]  # a diverged epoch has no point
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for a, b in points:
            draw.ellipse((a - 3, b - 3, a + 3, b + 3), fill=colour)
    if best is not None:
        for y in range(top, top + ph, 8):
            draw.line((px(best), y, px(best), y + 4), fill="gray")
        entries.append((f"best epoch {best}", "gray"))
    for k, (name, colour) in enumerate(entries):
        y = top + 8 + k * LINE
        draw.line((left + pw + 12, y, left + pw + 32, y), fill=colour, width=2)
        draw.text((left + pw + 38, y), name, fill="black", font=FONT, anchor="lm")
    return titled(img, [title])


CURVE_COLUMNS = ["epoch", "train_loss", "valid_f1", "valid_mask_f1", "valid_gender_f1", "valid_age_f1"]


def curves(metrics):
    """Training losses (the total and each head's) and validation F1s by epoch, from metrics.csv."""
    epochs = metrics["epoch"].to_numpy()
    loss_columns = [c for c in metrics if c.startswith("train_") and c not in ("train_images_per_s", "train_seconds")]
    losses = {"total" if c == "train_loss" else f"{c[6:]} head":
              (epochs, pd.to_numeric(metrics[c], errors="coerce").to_numpy()) for c in loss_columns}
    f1 = {name: (epochs, metrics[c].to_numpy()) for c, name in [("valid_f1", "macro F1 (18 classes)"),
          ("valid_mask_f1", "mask F1"), ("valid_gender_f1", "gender F1"), ("valid_age_f1", "age F1")]}
    best = int(metrics.loc[metrics["valid_f1"].idxmax(), "epoch"])
    top = np.nanmax(np.concatenate([v for _, v in losses.values()]))
    panels = [line_plot(losses, "training loss (mean over the epoch)", (0.0, top * 1.05)),
              line_plot(f1, "validation F1 (macro)", (0.0, 1.0), best)]
    return grid(panels, 2)


def grad_cam(model, images, size):
    """Grad-CAM of each image's predicted class on the backbone's feature map: the gradient of
    log p(class) averaged over space weighs each channel; relu of the weighted sum, upsampled to
    size (h, w) and scaled to 0..1 per image. Returns (cams B x h x w, class probabilities)."""
    features = []

    def cut(module, inputs, output):
        """Continue the forward pass from a leaf copy of the feature map: the gradient stops there."""
        features.append(output.detach().requires_grad_())
        return features[-1]

    hook = model.backbone.register_forward_hook(cut)
    try:
        with torch.enable_grad():
            probs = class_probabilities(model(images))
            chosen = probs[torch.arange(len(probs)), probs.argmax(1)]
            grads, = torch.autograd.grad(chosen.log().sum(), features[0])  # images are independent in eval mode
    finally:
        hook.remove()
    cam = F.relu((grads.mean((2, 3), keepdim=True) * features[0]).sum(1, keepdim=True)).detach()
    cam = F.interpolate(cam.float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    return cam / cam.amax((1, 2), keepdim=True).clamp_min(1e-12), probs.detach()


def jet(x):
    """Values 0..1 -> RGB uint8 of a jet-like colour map (blue, cyan, yellow, red)."""
    rgb = [np.clip(1.5 - np.abs(4 * x - k), 0, 1) for k in (3, 2, 1)]
    return (np.stack(rgb, -1) * 255).astype(np.uint8)


def gradcam_sheet(model, cfg, table, device, images_per_class, batch_size=32):
    _, normalize = build_transform("plain", cfg["resize"], cfg["mean"], cfg["std"])
    chosen = table.groupby("label").head(images_per_class).sort_values("label", kind="stable")
    boxes, _ = crop_boxes(chosen["image_path"].tolist(), cfg)
    inputs = [normalize(torch.from_numpy(decode_image(p, cfg["resize"], box)).permute(2, 0, 1)[None])[0]
              for p, box in zip(chosen["image_path"], boxes)]
    shown = [display_image(p, box, cfg) for p, box in zip(chosen["image_path"], boxes)]
    results = [grad_cam(model, torch.stack(inputs[k:k + batch_size]).to(device), shown[0].shape[:2])
               for k in range(0, len(inputs), batch_size)]
    cams, probs = (torch.cat(part).cpu() for part in zip(*results))
    rows = {}
    for label, image, cam, p in zip(chosen["label"], shown, cams.numpy(), probs):
        pred = int(p.argmax())
        overlay = Image.fromarray((0.55 * image + 0.45 * jet(cam)).astype(np.uint8))
        rows.setdefault(label, []).append(tile(overlay, [f"true: {class_name(label)}",
                                                          f"pred: {class_name(pred)} (p={p[pred]:.2f})"]))
    tiles = [t for row in rows.values() for t in row + [None] * (images_per_class - len(row))]
    per_row = max(1, 6 // images_per_class)  # about 6 tiles a row, whole classes only
    return titled(grid(tiles, images_per_class * per_row), [
        f"Grad-CAM of the predicted class, up to {images_per_class} validation images per true class",
        "red: regions that raise the predicted class's probability most; blue: none"])


def worst_sheet(table, cfg):
    probs = table[PROB_COLUMNS].to_numpy()
    worst = table.assign(p_true=probs[np.arange(len(table)), table["label"]]).nsmallest(WORST, "p_true")
    boxes, _ = crop_boxes(worst["image_path"].tolist(), cfg)
    tiles = [tile(Image.fromarray(display_image(r.image_path, box, cfg)),
                  [f"true: {class_name(r.label)} (p={r.p_true:.2f})",
                   f"pred: {class_name(r.pred)} (p={getattr(r, f'p{r.pred}'):.2f})",
                   f"{Path(r.image_path).parent.name}/{Path(r.image_path).name}"]) for r, box in zip(worst.itertuples(), boxes)]
    return titled(grid(tiles, 4), [f"the {len(tiles)} validation images with the lowest probability of the true class"])


# ---------------------------------------------------------------------------------------------
def write_report(run_dir, device="cpu", images_per_class=2):
    """Write the report PNGs of a run into run_dir/report/ (a k-fold run: into each fold<k>/report/);
    returns their paths. Like inference.py, it refuses an unfinished run, and a k-fold run with a
    fold not finished or without its valid_probs.csv, before writing anything."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    if not (run_dir / "valid_probs.csv").is_file():
        probs = [fold / "valid_probs.csv" for fold in fold_dirs(run_dir) if (fold / "valid_probs.csv").is_file()]
        if not probs:
            saved = saved_config(run_dir)
            stage = run_dir.name in ("refit", "pseudo") and (run_dir.parent / "config.json").is_file()
            why = (f"its {run_dir.name}/ model trains on every person, so nothing is left to validate it on; "
                   f"report on the run itself: --run {run_dir.parent}" if stage else
                   "a run without validation (--val_ratio 0) has none" if saved.get("val_ratio") == 0 else
                   "not a run folder (no config.json or summary.json)"
                   if not any((run_dir / name).is_file() for name in ("config.json", "summary.json")) else
                   "a run writes it when its first epoch is validated: not yet, or the file was deleted")
            raise FileNotFoundError(f"{run_dir}: no valid_probs.csv there or in fold<k>/ folders: {why}")
        check_folds_finished(run_dir, probs)  # every fold config.json names has a summary.json
        lost = [fold.name for fold in fold_dirs(run_dir)
                if (fold / "summary.json").is_file() and not (fold / "valid_probs.csv").is_file()]
        if lost:
            raise FileNotFoundError(f"{run_dir}: no valid_probs.csv in the finished fold(s) {', '.join(lost)}; "
                                    f"pass the other fold<k> folders to --run one at a time")
        return [path for p in probs for path in write_report(p.parent, device, images_per_class)]
    if not (run_dir / "metrics.csv").is_file():
        raise FileNotFoundError(f"{run_dir / 'metrics.csv'}: not found (a run writes it after every epoch)")
    model, cfg = load_model(find_checkpoints(run_dir)[0], device)  # refuses an unfinished run
    table = read_valid_probs(run_dir / "valid_probs.csv")
    n = len(table)
    images = {"confusion_18": heatmap(confusion_matrix(table["label"], table["pred"], labels=range(NUM_CLASSES)),
                                      [short_label(c) for c in range(NUM_CLASSES)],
                                      [f"18-class confusion, {n} validation images: rows true, columns predicted",
                                       "colour: share of the row; W wear, I incorrect, N not_wear; M male, F female"])}
    for task, true, pred in zip(TASK_NAMES, decode_class(table["label"]), decode_class(table["pred"])):
        images[f"confusion_{task}"] = heatmap(confusion_matrix(true, pred, labels=range(len(TASK_NAMES[task]))),
                                              list(TASK_NAMES[task]), [f"{task} confusion, {n} validation images",
                                                                  "rows true, columns predicted"])
    images["curves"] = curves(read_csv(run_dir / "metrics.csv", CURVE_COLUMNS, numeric=CURVE_COLUMNS))
    images["worst"] = worst_sheet(table, cfg)
    images["gradcam"] = gradcam_sheet(model, cfg, table, device, images_per_class)
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    for name, image in images.items():
        write_atomic(lambda tmp: image.save(tmp, format="PNG"), out / f"{name}.png")
    return [out / f"{name}.png" for name in images]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--run", required=True, help="run folder, or a k-fold run folder (one report per fold)")
    parser.add_argument("--images_per_class", type=int, default=2, help="Grad-CAM images per true class (default: 2)")
    args = parser.parse_args(argv)
    if args.images_per_class < 1:
        parser.error("--images_per_class must be at least 1")
    try:
        paths = write_report(args.run, images_per_class=args.images_per_class)
    except (FileNotFoundError, DataError) as e:
        raise SystemExit(f"error: {e}")
    print("\n".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
