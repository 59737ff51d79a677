"""Face crop (detect_faces.py, dataset crop boxes and their fallback) and the synthetic-mask
external-data writer (mask_faces.py)."""
import io
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, PngImagePlugin

import dataset as D
import detect_faces
import inference
import mask_faces
import train
from config import default_config
from make_sample_data import make_sample_dataset

FACE = {"x1": 20.0, "y1": 10.0, "x2": 60.0, "y2": 60.0}  # a 40 x 50 face in an 80 x 100 image


def face(**overrides):
    return pd.Series({"width": 80, "height": 100, **FACE, **overrides})


def write_faces(folder, box_of):
    """A faces.csv for every image under folder/images: box_of(relative path) -> box or None."""
    rows = []
    for path in detect_faces.image_files(folder):
        image = path.relative_to(folder).as_posix()
        with Image.open(path) as img:
            width, height = img.size
        box = box_of(image)
        rows.append({"image": image, "width": width, "height": height, "found": int(box is not None),
                     **(dict(zip(("x1", "y1", "x2", "y2"), box)) if box else {})})
    pd.DataFrame(rows, columns=D.FACE_COLUMNS).to_csv(Path(folder) / D.FACES_CSV, index=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces_data") / "sample"
    make_sample_dataset(root, n_train_people=18, n_eval_people=6, size=(48, 64), seed=0)
    return root


# ---------------------------------------------------------------------------------------------
# Crop geometry
def test_face_box_adds_the_margin_and_keeps_the_model_aspect_ratio():
    left, top, right, bottom = D.face_box(face(), margin=0.0, aspect=40 / 50)
    assert np.allclose([left * 80, top * 100, right * 80, bottom * 100], [20, 10, 60, 60])
    left, top, right, bottom = D.face_box(face(), margin=0.1, aspect=1.0)  # 48 x 60 -> 60 x 60
    assert np.isclose((right - left) * 80, 60) and np.isclose((bottom - top) * 100, 60)
    assert np.isclose((left + right) / 2 * 80, 40) and np.isclose((top + bottom) / 2 * 100, 35)


def test_face_box_moves_inside_the_image_and_shrinks_to_fit_it():
    left, top, right, bottom = D.face_box(face(x1=0.0, y1=0.0, x2=20.0, y2=20.0), margin=0.5, aspect=1.0)
    assert (left, top) == (0.0, 0.0) and np.isclose(right * 80, 40) and np.isclose(bottom * 100, 40)
    left, top, right, bottom = D.face_box(face(x1=0.0, x2=80.0), margin=0.5, aspect=1.0)  # 160 x 160 asked
    assert (left, right) == (0.0, 1.0) and np.isclose((bottom - top) * 100, 80)  # 80 x 80: the aspect kept
    assert top == 0.0 and np.isclose(bottom, 0.8)  # centred on the face (y 35) it would start at -5: moved in


def test_face_box_shrinks_to_fit_a_face_as_tall_as_the_image():
    # 20 x 100 face, margin 0.5: 40 x 200, widened to 50 x 200 for aspect 1/4; only the height overflows
    left, top, right, bottom = D.face_box(face(x1=30.0, y1=0.0, x2=50.0, y2=100.0), margin=0.5, aspect=0.25)
    assert (top, bottom) == (0.0, 1.0)
    assert np.isclose((right - left) * 80 / ((bottom - top) * 100), 0.25)  # 25 x 100: the aspect kept
    assert np.isclose((left + right) / 2 * 80, 40)  # around the face's centre


def test_decode_cuts_the_face_box(tmp_path):
    img = np.zeros((100, 80, 3), np.uint8)
    img[10:60, 20:60] = 250
    Image.fromarray(img).save(tmp_path / "a.png")
    out = D.decode_image(tmp_path / "a.png", (25, 20), D.face_box(face(), 0.0, 20 / 25))
    assert out.min() > 200  # only the bright face is left


# ---------------------------------------------------------------------------------------------
# Crop boxes from faces.csv, and the fallback
def crop_cfg(data, tmp_path, **kw):
    cfg = default_config("train")
    cfg.update(data_dir=str(data / "train"), resize=[20, 16], cache_dir=str(tmp_path / "cache"), num_workers=0,
               face_crop=True, face_margin=0.0)
    cfg.update(kw)
    return cfg


def test_images_without_a_face_get_the_median_face_box_and_are_counted(data, tmp_path, caplog):
    boxes_given = {}

    def box_of(image):
        if "normal" in image:
            return None
        k = len(boxes_given)
        boxes_given[image] = (4.0 + k % 3, 6.0, 36.0 + k % 3, 46.0)
        return boxes_given[image]

    write_faces(data / "train", box_of)
    images = D.read_train_images(data / "train")
    paths = images["image_path"].tolist()
    boxes, counts = D.crop_boxes(paths, crop_cfg(data, tmp_path, resize=[40, 32]))
    assert counts == {data / "train": (len(paths), images["file"].eq("normal").sum(), True)}
    expected = {image: D.face_box(face(width=48, height=64, x1=b[0], y1=b[1], x2=b[2], y2=b[3]), 0.0, 32 / 40)
                for image, b in boxes_given.items()}
    median = np.median(list(expected.values()), axis=0)
    for path, box in zip(paths, boxes):
        image = Path(path).relative_to(data / "train").as_posix()
        assert np.allclose(box, expected.get(image, median))
    assert len(expected) == len(paths) - 18 and len({tuple(b) for b in expected.values()}) == 3
    normals = [p for p, file in zip(paths, images["file"]) if file == "normal"]
    subset_boxes, _ = D.crop_boxes(normals, crop_cfg(data, tmp_path, resize=[40, 32]))
    assert np.allclose(subset_boxes, [median] * len(normals))  # a subset (validation, report) gets the same box
    with caplog.at_level("INFO", logger="mask"):
        D.log_face_counts(counts)
    assert f"a face in {len(paths) - 18} of {len(paths)} images; 18 without one" in caplog.text


def test_the_typical_face_box_is_the_median_not_the_mean(tmp_path):
    folder = tmp_path / "faces"
    folder.mkdir()
    for name in ("a.png", "b.png", "c.png", "d.png"):
        Image.new("RGB", (40, 40)).save(folder / name)
    boxes = {"a.png": (0.0, 0.0, 10.0, 10.0), "b.png": (0.0, 0.0, 10.0, 10.0), "c.png": (20.0, 20.0, 40.0, 40.0)}
    write_faces(folder, boxes.get)  # d.png: no face; c.png: an outlier that would pull a mean
    paths = [str(folder / name) for name in ("d.png", "a.png", "c.png")]
    found, counts = D.crop_boxes(paths, crop_cfg(tmp_path, tmp_path, resize=[20, 20]))
    assert np.allclose(found, [(0.0, 0.0, 0.25, 0.25), (0.0, 0.0, 0.25, 0.25), (0.5, 0.5, 1.0, 1.0)])
    assert counts == {folder: (3, 1, True)}


def test_a_folder_without_any_face_is_used_whole_and_says_so(data, tmp_path, caplog):
    write_faces(data / "train", lambda image: None)
    paths = D.read_train_images(data / "train")["image_path"].tolist()
    boxes, counts = D.crop_boxes(paths, crop_cfg(data, tmp_path))
    assert boxes == [D.FULL_IMAGE] * len(paths) and counts == {data / "train": (len(paths), len(paths), False)}
    with caplog.at_level("INFO", logger="mask"):
        D.log_face_counts(counts)
    assert f"no face in any image, so its {len(paths)} images are used whole" in caplog.text
    assert "median face box" not in caplog.text


def test_face_crop_dataset_is_the_same_with_and_without_cache(data, tmp_path):
    write_faces(data / "train", lambda image: None if "mask2" in image else (8.0, 8.0, 40.0, 48.0))
    table = D.add_labels(D.read_train_images(data / "train"), 60).iloc[::5].reset_index(drop=True)
    transform, _ = D.build_transform("plain", [20, 16], [0.5] * 3, [0.2] * 3)
    cached = D.make_dataset(table, crop_cfg(data, tmp_path), transform)
    direct = D.make_dataset(table, crop_cfg(data, tmp_path, cache_dir=""), transform)
    uncropped = D.make_dataset(table, crop_cfg(data, tmp_path, face_crop=False), transform)
    assert all(np.array_equal(cached[i][0], direct[i][0]) for i in range(len(table)))
    assert any(not np.array_equal(cached[i][0], uncropped[i][0]) for i in range(len(table)))


def test_face_crop_without_faces_csv_names_the_file_and_the_fix(tmp_path):
    root = tmp_path / "d"
    make_sample_dataset(root, n_train_people=1, n_eval_people=1, size=(24, 32), seed=1)
    paths = D.read_train_images(root / "train")["image_path"].tolist()
    with pytest.raises(D.DataError, match=r"train/faces.csv: not found.*detect_faces.py --face_dirs"):
        D.crop_boxes(paths, crop_cfg(root, tmp_path))
    write_faces(root / "train", lambda image: (1.0, 1.0, 20.0, 20.0))
    table = pd.read_csv(root / "train" / "faces.csv")
    table.iloc[1:].to_csv(root / "train" / "faces.csv", index=False)
    with pytest.raises(D.DataError, match=r"faces.csv: no row for .*run python detect_faces.py"):
        D.crop_boxes(paths, crop_cfg(root, tmp_path))
    (root / "train" / "faces.csv").write_text("")  # e.g. a detect_faces.py run killed before its first row
    with pytest.raises(D.DataError, match=r"train/faces.csv: cannot parse CSV .*rerun python detect_faces.py"):
        D.crop_boxes(paths, crop_cfg(root, tmp_path))


XMP_TURNED = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
              '<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')


def save_turned(path, how):
    """A 30 x 20 image whose rotation tag (orientation 6: shown 20 x 30) is stored as `how` says."""
    image = Image.new("RGB", (30, 20))
    exif = Image.Exif()
    exif[D.EXIF_ORIENTATION] = 6
    if how == "exif":
        image.save(path, exif=exif)
    elif how == "xmp" and path.suffix == ".jpg":
        image.save(path, xmp=XMP_TURNED.encode())
    elif how == "xmp":
        info = PngImagePlugin.PngInfo()
        info.add_itxt("XML:com.adobe.xmp", XMP_TURNED)
        image.save(path, pnginfo=info)
    elif how == "imagemagick":  # a PNG text chunk holding the EXIF in hex
        raw = exif.tobytes()
        info = PngImagePlugin.PngInfo()
        info.add_text("Raw profile type exif", f"\nexif\n{len(raw):8d}\n{raw.hex()}\n", zip=True)
        image.save(path, pnginfo=info)
    else:  # after the pixels, where only decoding the PNG finds it
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        data, body = buffer.getvalue(), exif.tobytes()[6:]  # without the "Exif\0\0" header
        chunk = struct.pack(">I", len(body)) + b"eXIf" + body + struct.pack(">I", zlib.crc32(b"eXIf" + body))
        end = data.rindex(b"IEND") - 4
        path.write_bytes(data[:end] + chunk + data[end:])


@pytest.mark.parametrize("name, how", [("a.jpg", "exif"), ("a.png", "exif"), ("a.jpg", "xmp"), ("a.png", "xmp"),
                                       ("a.png", "imagemagick"), ("a.png", "late")])
def test_the_size_read_rgb_gives_is_one_the_header_allows(tmp_path, name, how):
    """header_sizes reads the rotation where the header holds it, as read_rgb applies it, and
    allows both orientations where only decoding the PNG would tell."""
    path = tmp_path / name
    save_turned(path, how)
    assert D.read_rgb(path).size == (20, 30)
    sizes = D.header_sizes(path)
    assert (20, 30) in sizes and len(sizes) == (1 if name.endswith(".jpg") or how == "exif" else 2)
    Image.new("RGB", (30, 20)).save(path)  # no rotation at all
    assert D.header_sizes(path)[0] == D.read_rgb(path).size == (30, 20)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_the_header_size_of_a_jpeg_is_its_upright_size_for_every_orientation(tmp_path, orientation):
    path = tmp_path / "a.jpg"
    exif = Image.Exif()
    exif[D.EXIF_ORIENTATION] = orientation
    Image.new("RGB", (30, 20)).save(path, exif=exif)
    assert D.header_sizes(path) == [D.read_rgb(path).size]
    assert D.read_rgb(path).size == ((20, 30) if orientation >= 5 else (30, 20))


def test_images_changed_since_their_faces_were_found_are_refused(tmp_path):
    """faces.csv boxes are fractions of the size detection saw: a replaced image of another size
    would be cut in the wrong place, so it stops the run, naming the image, both sizes and the fix."""
    root = tmp_path / "d"
    make_sample_dataset(root, n_train_people=2, n_eval_people=1, size=(24, 32), seed=1)
    paths = D.read_train_images(root / "train")["image_path"].tolist()
    turned, replaced, broken = paths[0], paths[1], paths[2]
    exif = Image.Exif()
    exif[D.EXIF_ORIENTATION] = 6  # stored on its side, 32 x 24, shown (and detected) 24 x 32
    Image.open(turned).transpose(Image.Transpose.ROTATE_90).save(turned, exif=exif)
    write_faces(root / "train", lambda image: (2.0, 2.0, 20.0, 24.0))
    data = Path(broken).read_bytes()
    Path(broken).write_bytes(data[:len(data) * 3 // 4])  # truncated: unreadable then and now
    assert D.header_sizes(broken) == [(24, 32)] and not D.is_readable(broken)  # its header is whole
    table = pd.read_csv(root / "train" / "faces.csv")
    table.loc[table["image"].str.endswith(Path(turned).name) & table["image"].str.contains(Path(turned).parent.name),
              ["width", "height"]] = [24, 32]  # as detect_faces.py records it: upright
    broken_row = table["image"].str.endswith(Path(broken).name) & table["image"].str.contains(Path(broken).parent.name)
    table.loc[broken_row, ["width", "height", "found"]] = [None, None, 0]
    table.to_csv(root / "train" / "faces.csv", index=False)
    D.crop_boxes(paths, crop_cfg(root, tmp_path))  # the turned image and the broken one pass here

    Image.open(replaced).resize((48, 64)).save(replaced)
    message = (rf"train/faces.csv: 1 image\(s\) changed since detect_faces.py found their faces, e.g. "
               rf"{re.escape(str(replaced))} \(48x64, was 24x32\).*detect_faces.py --face_dirs .*train again")
    with pytest.raises(D.DataError, match=message):
        D.crop_boxes(paths, crop_cfg(root, tmp_path))
    Image.open(replaced).resize((24, 32)).save(replaced)
    Image.new("RGB", (24, 32)).save(broken, format="JPEG")  # readable now, but detection saw it unreadable
    with pytest.raises(D.DataError, match=rf"1 image\(s\) changed .*{re.escape(str(broken))} \(24x32, unreadable then\)"):
        D.crop_boxes(paths, crop_cfg(root, tmp_path))


def test_changed_images_of_two_folders_are_named_under_the_first_folder_s_faces_csv_only(tmp_path):
    folders = [tmp_path / "one", tmp_path / "two"]
    paths = []
    for folder in folders:
        folder.mkdir()
        for name in ("a.png", "b.png"):
            Image.new("RGB", (24, 32)).save(folder / name)
            paths.append(str(folder / name))
        write_faces(folder, lambda image: (2.0, 2.0, 20.0, 24.0))
    D.crop_boxes(paths, crop_cfg(tmp_path, tmp_path))
    for folder in folders:
        Image.new("RGB", (48, 64)).save(folder / "b.png")
    with pytest.raises(D.DataError) as error:
        D.crop_boxes(paths, crop_cfg(tmp_path, tmp_path))
    message = str(error.value)
    assert message.startswith(f"{folders[0] / D.FACES_CSV}: 1 image(s) changed")
    assert str(folders[0] / "b.png") in message and str(folders[1] / "b.png") not in message
    assert message.endswith(f"--face_dirs {folders[0]} again")


def test_a_replaced_image_of_the_same_size_is_refused_by_its_file_size(tmp_path):
    """detect_faces.py records each file's size in bytes, so an image replaced by another of the
    same pixel size (which the header check cannot see) stops the run too; a faces.csv written
    before that column existed is still read, with the pixel-size check alone."""
    root = tmp_path / "d"
    make_sample_dataset(root, n_train_people=2, n_eval_people=1, size=(24, 32), seed=1)
    paths = D.read_train_images(root / "train")["image_path"].tolist()
    table, _ = detect_faces.detect_folder(root / "train", FakeDetector())
    assert table[D.FILE_BYTES].tolist() == [Path(root / "train", image).stat().st_size for image in table["image"]]
    table.to_csv(root / "train" / D.FACES_CSV, index=False)
    D.crop_boxes(paths, crop_cfg(root, tmp_path))
    before = Path(paths[3]).stat().st_size
    Image.open(paths[3]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(paths[3], quality=60)  # same 24x32
    after = Path(paths[3]).stat().st_size
    assert D.header_sizes(paths[3]) == [(24, 32)] and after != before
    with pytest.raises(D.DataError, match=rf"1 image\(s\) changed .*{re.escape(str(paths[3]))} \(a file of {after} "
                                          rf"bytes, was {before}\).*detect_faces.py --face_dirs .*train again"):
        D.crop_boxes(paths, crop_cfg(root, tmp_path))
    table.drop(columns=D.FILE_BYTES).to_csv(root / "train" / D.FACES_CSV, index=False)  # an older faces.csv
    D.crop_boxes(paths, crop_cfg(root, tmp_path))


def test_train_and_inference_crop_train_and_eval_faces(data, tmp_path):
    """A face-crop run trains, reports and predicts; inference reads eval/faces.csv."""
    write_faces(data / "train", lambda image: (6.0, 8.0, 42.0, 50.0))
    cfg = default_config("train")
    cfg.update(data_dir=str(data / "train"), model="basemodel", pretrained=False, resize=[32, 24], epochs=1,
               batch_size=16, num_workers=0, cache_dir=str(tmp_path / "cache"), model_dir=str(tmp_path / "runs"),
               val_ratio=0.34, face_crop=True, device="cpu")
    run, _ = train.main(cfg)
    assert (run / "report" / "gradcam.png").is_file()
    icfg = {**default_config("inference"), "run": [str(run)], "num_workers": 0, "cache_dir": str(tmp_path / "cache"),
            "tta": "none", "device": "cpu"}
    with pytest.raises(SystemExit, match=r"eval/faces.csv: not found"):
        inference.main(icfg)
    write_faces(data / "eval", lambda image: None if image.endswith(("0.jpg", "1.jpg")) else (6.0, 8.0, 42.0, 50.0))
    submission = pd.read_csv(inference.main(icfg))
    assert submission["ImageID"].tolist() == pd.read_csv(data / "eval" / "info.csv")["ImageID"].tolist()


# ---------------------------------------------------------------------------------------------
# detect_faces.py
class FakeDetector:
    """Finds a face in every image wider than 30 pixels; records the batch shapes it was given."""

    def __init__(self):
        self.batches = []

    def __call__(self, images):
        self.batches.append({img.shape for img in images})
        points = np.array([[10, 12], [20, 12], [15, 18], [11, 24], [19, 24]], float)
        return [(np.array([5.0, 6.0, 25.0, 30.0]), 0.99, points) if img.shape[1] > 30 else None for img in images]


def test_detect_folder_writes_one_row_per_image_in_size_groups(tmp_path):
    folder = tmp_path / "faces"
    (folder / "images" / "p").mkdir(parents=True)
    for k, size in enumerate([(40, 50), (20, 30), (40, 50)]):
        Image.new("RGB", size, (k * 50, 0, 0)).save(folder / "images" / "p" / f"{k}.png")
    (folder / "images" / "p" / "._0.png").write_bytes(b"not an image")  # a macOS copy: ignored
    detector = FakeDetector()
    table, errors = detect_faces.detect_folder(folder, detector, batch_size=8)
    assert errors == []
    assert table["image"].tolist() == ["images/p/0.png", "images/p/1.png", "images/p/2.png"]
    assert table["found"].tolist() == [1, 0, 1] and table.loc[1, ["x1", "nose_x"]].isna().all()
    assert table.loc[0, ["width", "height", "x1", "y2", "mouth_right_x", "mouth_right_y"]].tolist() == [40, 50, 5, 30, 19, 24]
    assert all(len(shapes) == 1 for shapes in detector.batches)  # one image size per detector call


def test_an_unreadable_image_gets_a_row_without_a_face_and_is_named(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "bad.jpg").write_bytes(b"not a jpeg")
    Image.new("RGB", (40, 50)).save(tmp_path / "images" / "good.png")
    table, errors = detect_faces.detect_folder(tmp_path, FakeDetector(), batch_size=1)
    assert table["image"].tolist() == ["images/bad.jpg", "images/good.png"] and table["found"].tolist() == [0, 1]
    assert len(errors) == 1 and re.search(r"bad.jpg: unreadable", errors[0])
    table.to_csv(tmp_path / D.FACES_CSV, index=False)  # and training reads that faces.csv back
    assert [face.found for face in D.read_faces(tmp_path).values()] == [0, 1]
    assert (tmp_path / D.FACES_CSV).read_text().splitlines()[2].startswith("images/good.png,40,50,1,")  # sizes stay whole


def test_mtcnn_runs_on_a_batch():
    """The real detector (facenet-pytorch, installed by make install) answers for every image."""
    detector = detect_faces.FaceDetector("cpu")
    images = [np.full((64, 48, 3), v, np.uint8) for v in (0, 128)]
    assert detector(images) == [None, None]  # flat images hold no face



class FakeMTCNN:
    """MTCNN.detect's answer for a batch: a face (the largest first, then a small one) in the
    images whose first pixel value is in `finds`, None elsewhere; records what it was given."""
    min_face_size = 20

    def __init__(self, finds):
        self.finds, self.calls = finds, []

    def detect(self, batch, landmarks):
        values = [int(img[0, 0, 0]) for img in batch]
        self.calls.append(values)
        hit = [v in self.finds for v in values]
        return ([np.array([[v, 1, 30, 40], [0, 0, 5, 5]], float) if h else None for v, h in zip(values, hit)],
                [np.array([0.9, 0.5]) if h else None for h in hit],
                [np.stack([np.full((5, 2), v, float), np.zeros((5, 2))]) if h else None for v, h in zip(values, hit)])


def test_faces_the_first_pass_misses_get_a_second_more_permissive_pass():
    real = detect_faces.FaceDetector("cpu")
    assert [m.thresholds for m in real.passes] == [[0.6, 0.7, 0.7], [0.4, 0.5, 0.5]]
    assert all(m.select_largest for m in real.passes)
    detector = object.__new__(detect_faces.FaceDetector)
    detector.passes = [FakeMTCNN({1}), FakeMTCNN({1, 2})]
    found = detector([np.full((40, 30, 3), v, np.uint8) for v in (1, 2, 3)])
    assert [m.calls for m in detector.passes] == [[[1, 2, 3]], [[2, 3]]]  # only the missed ones again
    assert found[2] is None
    for v, (box, score, points) in zip((1, 2), found):  # the first (largest) face of each
        assert box.tolist() == [v, 1, 30, 40] and score == 0.9 and points.tolist() == [[v, v]] * 5

MASKBENCH_FACES = Path(__file__).resolve().parents[2] / "shared" / "maskbench" / "faces"


@pytest.mark.skipif(not MASKBENCH_FACES.is_dir(), reason="needs ../shared/maskbench beside the project (read in place)")
def test_mtcnn_finds_a_real_face_and_its_landmarks():
    """A real face photo (UTKFace, 200x200, face centred), batched with a flat image: a box
    around the middle, eyes above the nose above the mouth, the left eye on the left. The other
    detector tests could pass with a detector that never finds anything."""
    photo = np.asarray(D.read_rgb(sorted(MASKBENCH_FACES.glob("*.jpg"))[0]))
    flat, found = detect_faces.FaceDetector("cpu")([np.full_like(photo, 128), photo])
    assert flat is None and found is not None
    (x1, y1, x2, y2), score, points = found
    h, w = photo.shape[:2]
    assert score > 0.9 and x1 < w / 2 < x2 and y1 < h / 2 < y2 and x2 - x1 > w / 3  # it may reach past the edge
    (lx, ly), (rx, ry), (nx, ny), (mlx, mly), (mrx, mry) = points
    assert lx < nx < rx and max(ly, ry) < ny < min(mly, mry) and mlx < mrx


def test_mtcnn_finds_no_face_in_an_image_too_small_to_search():
    detector = detect_faces.FaceDetector("cpu")
    for size in ((5, 5), (11, 11), (8, 400)):
        assert detector([np.zeros((*size, 3), np.uint8)]) == [None]


def face_folders(root, names):
    for name in names:
        (root / name / "images").mkdir(parents=True)
        Image.new("RGB", (40, 50)).save(root / name / "images" / "a.png")
    return [str(root / name) for name in names]


def test_detect_faces_checks_every_folder_and_setting_before_detecting(tmp_path, monkeypatch):
    monkeypatch.setattr(detect_faces, "FaceDetector", lambda device: FakeDetector())
    good, = face_folders(tmp_path, ["good"])
    with pytest.raises(SystemExit, match=r"missing: folder not found"):
        detect_faces.main(["--face_dirs", good, str(tmp_path / "missing")])
    assert not (tmp_path / "good" / D.FACES_CSV).exists()
    with pytest.raises(SystemExit, match=r"--detect_batch_size must be at least 1, got 0"):
        detect_faces.main(["--face_dirs", good, "--detect_batch_size", "0"])
    make_sample_dataset(tmp_path / "d", n_train_people=1, n_eval_people=1, size=(24, 32), seed=2)
    with pytest.raises(SystemExit, match=r"d: no train.csv: --data_dir is the training folder"):
        detect_faces.main(["--data_dir", str(tmp_path / "d")])  # the dataset root, not its train/


class InterruptedFolderDetector(FakeDetector):
    """Ctrl-C in its second folder."""

    def __call__(self, images):
        if self.batches:
            raise KeyboardInterrupt
        return super().__call__(images)


def test_detect_faces_names_the_files_it_replaces_and_an_interrupt_keeps_the_rest(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(detect_faces, "FaceDetector", lambda device: InterruptedFolderDetector())
    folders = face_folders(tmp_path, ["a", "b"])
    for folder in folders:
        (Path(folder) / D.FACES_CSV).write_text("old")
    with pytest.raises(SystemExit) as stop:
        detect_faces.main(["--face_dirs", *folders])
    assert stop.value.code == 130
    out = capsys.readouterr().out
    assert all(f"{Path(folder) / D.FACES_CSV} will be replaced" in out for folder in folders)
    assert f"interrupted: {Path(folders[0]) / D.FACES_CSV} written, every other faces.csv unchanged" in out
    assert pd.read_csv(Path(folders[0]) / D.FACES_CSV)["found"].tolist() == [1]
    assert (Path(folders[1]) / D.FACES_CSV).read_text() == "old"
    assert sorted(p.name for p in Path(folders[1]).iterdir()) == [D.FACES_CSV, "images"]  # no temporary file left


# ---------------------------------------------------------------------------------------------
# mask_faces.py
def test_read_labels_from_utkface_names_lists_bad_names(tmp_path):
    for name in ("25_1_2_2017.jpg.chip.jpg", "61_0_0_2016.jpg", "61_0_2016.jpg", "25_1__x.jpg", "notes.txt", ".hidden.jpg",
                 "0_0_0_a.jpg", "200_1_4_b.jpg"):
        (tmp_path / name).write_bytes(b"")
    table, skipped = mask_faces.read_labels(tmp_path)
    assert table.values.tolist() == [["25_1_2_2017.jpg.chip.jpg", 25, 1, "Asian"], ["61_0_0_2016.jpg", 61, 0, "White"]]
    assert skipped == [("0_0_0_a.jpg", "age 0 is not between 1 and 120"), ("200_1_4_b.jpg", "age 200 is not between 1 and 120")] + \
        [(name, "name is not {age}_{gender}_{race}_*") for name in ("25_1__x.jpg", "61_0_2016.jpg")]


def test_read_labels_from_a_csv_cleans_the_race_for_folder_names(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "b.jpg").write_bytes(b"")
    (tmp_path / "labels.csv").write_text("file,age,gender,race\na.jpg,70,female,East Asian\nb.jpg,30,1,White/Asian_x\n")
    table, _ = mask_faces.read_labels(tmp_path, tmp_path / "labels.csv")
    assert table.values.tolist() == [["a.jpg", 70, 1, "East-Asian"], ["b.jpg", 30, 1, "White-Asian-x"]]  # no '/' or '_'


@pytest.mark.parametrize("rows, message", [
    ("a.jpg,old,female", r"line 2: age 'old'"),
    ("c.jpg,50,1", r"line 2: .*c.jpg not found"),
    ("b.jpg,50,1\na.jpg,0,female", r"line 3: age 0 is not between 1 and 120"),
    ("a.jpg,200,female", r"line 2: age 200 is not between 1 and 120"),
    ("a.jpg,50,1\nb.jpg,50,1\na.jpg,50,1", r"lines 2, 4: the same file more than once"),
    ("b.jpg,50,1\n\n  \na.jpg,old,female", r"line 5: age 'old'"),  # blank lines count, as in the file
    ("a.jpg,50,1\n\nb.jpg,50,1\na.jpg,50,1", r"lines 2, 5: the same file more than once"),
])
def test_read_labels_from_a_csv_names_the_bad_line(tmp_path, rows, message):
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "labels.csv").write_text(f"file,age,gender\n{rows}\n")
    with pytest.raises(D.DataError, match=rf"labels.csv: {message}"):
        mask_faces.read_labels(tmp_path, tmp_path / "labels.csv")


def test_mask_faces_checks_the_frame_and_face_width_before_any_work(tmp_path):
    args = ["--faces_dir", str(tmp_path), "--masked_out", str(tmp_path / "out")]
    for flags, message in ((["--masked_frame", "-10", "-10"], "--masked_frame must be"),
                           (["--masked_frame", "512", "0"], r"--masked_frame must be .*0 0 to keep .*got 512 0"),
                           (["--masked_face_width", "0"], "--masked_face_width must be above 0, got 0"),
                           (["--masked_face_width", "-1"], "--masked_face_width must be above 0"),
                           (["--seed", "-1"], "--seed must be at least 0, got -1")):
        with pytest.raises(SystemExit, match=message):
            mask_faces.main(args + flags)
    assert not (tmp_path / "out").exists()


class LandmarkDetector:
    """Eyes, nose and mouth corners of a 60 x 60 face photo; no face in photos narrower than 50."""

    def __call__(self, images):
        points = np.array([[20, 22], [40, 22], [30, 32], [22, 42], [38, 42]], float)
        return [(np.array([8.0, 5.0, 52.0, 58.0]), 0.99, points) if img.shape[1] >= 50 else None for img in images]


def test_masked_people_are_written_in_the_competition_layout(tmp_path):
    faces = tmp_path / "utk"
    faces.mkdir()
    rng = np.random.default_rng(0)
    for name, width in (("65_1_2_a.jpg", 60), ("30_0_2_b.jpg", 60), ("70_0_2_c.jpg", 40)):
        Image.fromarray(rng.integers(90, 160, (60, width, 3), dtype=np.uint8)).save(faces / name)
    table, _ = mask_faces.read_labels(faces)
    out = tmp_path / "external"
    skipped = mask_faces.write_people(table, faces, out, LandmarkDetector(), frame=(80, 60), face_width=0.86, seed=0)
    assert skipped == [("70_0_2_c.jpg", "no face found")]
    images = D.add_labels(D.read_train_images(out / "train"), 60)  # the reader accepts it as it is
    people = images.drop_duplicates("id").sort_values("age")
    assert people[["gender", "age"]].values.tolist() == [[0, 30], [1, 65]]
    assert sorted(images.loc[images["age"] == 65, "label"]) == sorted([5] * 5 + [11, 17])
    folder = out / "train" / "images" / images.loc[images["age"] == 65, "image_path"].map(lambda p: Path(p).parent.name).iloc[0]
    shots = {p.stem: np.asarray(Image.open(p), np.float32) for p in folder.iterdir()}
    assert all(s.shape == (80, 60, 3) for s in shots.values())
    top_row = {}  # the first row changed by over half its mask's strongest change: the mask's upper edge
    for name in ("mask1", "mask2", "mask3", "mask4", "mask5", "incorrect_mask"):
        change = np.abs(shots[name] - shots["normal"]).mean(axis=2)
        assert change[5:15].mean() < 6 < change[45:55].mean(), name  # forehead untouched, chin covered
        rows = change.mean(axis=1)
        top_row[name] = int(np.flatnonzero(rows > rows.max() / 2)[0])
    worn = [top_row[f"mask{k}"] for k in range(1, 6)]
    assert top_row["incorrect_mask"] > max(worn) + 2, top_row  # below the nose or on the chin, not over it
    extra = D.read_extra([str(out / "train")])[0]  # plugs into --extra_data
    assert len(extra) == 14 and extra["id"].str.startswith("extra0:").all()


def test_masked_people_are_the_same_for_the_same_seed(tmp_path):
    faces = tmp_path / "utk"
    faces.mkdir()
    Image.fromarray(np.random.default_rng(1).integers(90, 160, (60, 60, 3), dtype=np.uint8)).save(faces / "40_1_2_x.jpg")
    table, _ = mask_faces.read_labels(faces)
    for out, seed in (("a", 0), ("b", 0), ("c", 1)):
        mask_faces.write_people(table, faces, tmp_path / out, LandmarkDetector(), frame=(80, 60), face_width=0.86, seed=seed)
    read = {out: (tmp_path / out / "train" / "images" / "000001_female_Asian_40" / "mask1.jpg").read_bytes() for out in "abc"}
    assert read["a"] == read["b"] != read["c"]


def test_mask_faces_refuses_to_write_over_a_dataset(tmp_path):
    (tmp_path / "out" / "train").mkdir(parents=True)
    (tmp_path / "out" / "train" / "train.csv").write_text("id,gender,race,age,path\n")
    with pytest.raises(SystemExit, match="already holds a dataset"):
        mask_faces.main(["--faces_dir", str(tmp_path), "--masked_out", str(tmp_path / "out")])


def test_faces_of_an_images_folder_go_beside_it_where_training_reads_them(tmp_path, monkeypatch):
    monkeypatch.setattr(detect_faces, "FaceDetector", lambda device: FakeDetector())
    folder, = face_folders(tmp_path, ["train"])
    detect_faces.main(["--face_dirs", str(Path(folder) / "images")])
    assert (Path(folder) / D.FACES_CSV).is_file() and not (Path(folder) / "images" / D.FACES_CSV).exists()
    assert D.dataset_folder(Path(folder) / "images" / "a.png") == Path(folder)
    assert D.read_faces(Path(folder))[D.image_key(Path(folder) / "images" / "a.png")].found


def test_detect_faces_defaults_to_the_train_and_eval_folders(tmp_path):
    make_sample_dataset(tmp_path / "d", n_train_people=1, n_eval_people=1, size=(24, 32), seed=2)
    assert detect_faces.default_folders(tmp_path / "d" / "train" / "images") == [tmp_path / "d" / "train", tmp_path / "d" / "eval"]
    shutil.rmtree(tmp_path / "d" / "eval")
    assert detect_faces.default_folders(tmp_path / "d" / "train") == [tmp_path / "d" / "train"]


def test_mask_faces_skips_an_unreadable_photo_and_names_it(tmp_path):
    faces = tmp_path / "utk"
    faces.mkdir()
    (faces / "40_1_2_x.jpg").write_bytes(b"not a jpeg")
    Image.new("RGB", (60, 60), (120, 100, 90)).save(faces / "50_0_2_y.jpg")
    table, _ = mask_faces.read_labels(faces)
    skipped = mask_faces.write_people(table, faces, tmp_path / "out", LandmarkDetector(), frame=(80, 60), face_width=0.86, seed=0)
    assert len(skipped) == 1 and skipped[0][0] == "40_1_2_x.jpg" and "40_1_2_x.jpg: unreadable" in skipped[0][1]
    assert pd.read_csv(tmp_path / "out" / "train" / "train.csv")["age"].tolist() == [50]


class InterruptedDetector(LandmarkDetector):
    """Ctrl-C at its second photo."""

    def __init__(self):
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        if self.calls == 2:
            raise KeyboardInterrupt
        return super().__call__(images)


def two_utkface_photos(tmp_path):
    """Two photos named as UTKFace names them, their labels, and write_people's other arguments."""
    faces = tmp_path / "utk"
    faces.mkdir()
    for k, name in enumerate(("40_1_2_x.jpg", "50_0_2_y.jpg")):
        Image.new("RGB", (60, 60), (120 + 20 * k, 100, 90)).save(faces / name)
    table, _ = mask_faces.read_labels(faces)
    return faces, table, dict(frame=(80, 60), face_width=0.86, seed=0)


def test_an_interrupted_mask_faces_run_continues_where_it_stopped(tmp_path):
    faces, table, args = two_utkface_photos(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        mask_faces.write_people(table, faces, tmp_path / "cut", InterruptedDetector(), **args)
    assert not (tmp_path / "cut" / "train" / "train.csv").exists()
    rerun = InterruptedDetector()
    rerun.calls = 2  # past its interruption
    mask_faces.write_people(table, faces, tmp_path / "cut", rerun, **args)
    assert rerun.calls == 3  # the first person was kept, only the second one detected and drawn
    mask_faces.write_people(table, faces, tmp_path / "whole", LandmarkDetector(), **args)
    for run in ("cut", "whole"):
        assert pd.read_csv(tmp_path / run / "train" / "train.csv")["age"].tolist() == [40, 50]
    cut, whole = (sorted(p.relative_to(tmp_path / run) for p in (tmp_path / run).rglob("*.jpg")) for run in ("cut", "whole"))
    assert cut == whole and len(cut) == 14
    assert all((tmp_path / "cut" / p).read_bytes() == (tmp_path / "whole" / p).read_bytes() for p in cut)



def test_a_person_cut_short_between_images_is_drawn_again_whole(tmp_path):
    faces, table, args = two_utkface_photos(tmp_path)
    out = tmp_path / "out"
    mask_faces.write_people(table, faces, out, LandmarkDetector(), **args)
    before = {p: p.read_bytes() for p in out.rglob("*.jpg")}
    folder = min(before).parent
    for name in ("incorrect_mask.jpg", "normal.jpg"):  # the last two saved: the run stopped before them
        (folder / name).unlink()
    (out / "train" / "train.csv").unlink()
    mask_faces.write_people(table, faces, out, LandmarkDetector(), **args)
    assert {p: p.read_bytes() for p in out.rglob("*.jpg")} == before

def test_a_continued_mask_faces_run_refuses_other_arguments(tmp_path):
    faces, table, args = two_utkface_photos(tmp_path)
    mask_faces.write_people(table.iloc[:1], faces, tmp_path / "out", LandmarkDetector(), **args)  # as if cut short
    for changed, message in (({"frame": (0, 0)}, r"--masked_frame \[80, 60\] \(now \[0, 0\]\)"),
                             ({"seed": 1, "face_width": 0.9}, r"--masked_face_width 0.86 \(now 0.9\); --seed 0 \(now 1\)"),
                             ({"table": table}, "the photos, their labels or order")):
        call = {"table": table.iloc[:1], **args, **changed}
        with pytest.raises(D.DataError, match=rf"arguments.json: this output was started with other arguments .*{message}"):
            mask_faces.write_people(call.pop("table"), faces, tmp_path / "out", LandmarkDetector(), **call)
    mask_faces.write_people(table.iloc[:1], faces, tmp_path / "out", LandmarkDetector(), **args)  # the same: goes on
