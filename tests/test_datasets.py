"""Fashion-MNIST preparation and the ImageFolder scan on real files."""
import gzip
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.datasets import CLASSES, DEBIAN_DIR, prepare_fashion_mnist, read_idx
from pipeline.imagefolder import scan_image_folder


def test_prepared_layout_counts_and_pixels(fmnist_root):
    train = scan_image_folder(fmnist_root / "train")
    val = scan_image_folder(fmnist_root / "val")
    assert len(train) == 60000 and len(val) == 10000 and not train.skipped
    assert train.classes == [f"{k}_{c}" for k, c in enumerate(CLASSES)]
    assert np.bincount(train.labels).tolist() == [6000] * 10  # balanced, as published
    labels = read_idx(DEBIAN_DIR / "train-labels-idx1-ubyte.gz")
    images = read_idx(DEBIAN_DIR / "train-images-idx3-ubyte.gz")
    path = fmnist_root / "train" / f"{labels[123]}_{CLASSES[labels[123]]}" / "00123.jpg"
    with Image.open(path) as im:
        assert im.mode == "RGB" and im.size == (28, 28)
        px = np.asarray(im).astype(int)
    assert np.abs(px[..., 0] - images[123].astype(int)).mean() < 4  # JPEG q95 of the same pixels


def test_prepare_is_idempotent(fmnist_root):
    marker_time = os.stat(fmnist_root / ".complete.json").st_mtime_ns
    assert prepare_fashion_mnist(fmnist_root, progress=False) == fmnist_root
    assert os.stat(fmnist_root / ".complete.json").st_mtime_ns == marker_time


def test_missing_source_names_apt_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        prepare_fashion_mnist(tmp_path / "out", src=tmp_path / "nowhere")
    assert not (tmp_path / "out").exists()


def test_refuses_foreign_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        prepare_fashion_mnist(tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep me"


def test_truncated_idx_is_refused(tmp_path):
    data = gzip.open(DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz").read()
    (tmp_path / "bad.gz").write_bytes(gzip.compress(data[:-10]))
    with pytest.raises(ValueError, match="expected"):
        read_idx(tmp_path / "bad.gz")


def test_scan_skips_and_counts_corrupt_files(fmnist_slice, photo_dir, tmp_path):
    root = tmp_path / "train"
    shutil.copytree(fmnist_slice / "train", root)
    victim = sorted((root / "3_Dress").iterdir())[0]
    good = victim.read_bytes()
    victim.write_bytes(good[: len(good) // 2])  # truncated JPEG
    (root / "3_Dress" / "notes.jpg").write_text("not an image")
    (root / "3_Dress" / "readme.txt").write_text("ignored: no image extension")
    shutil.copy(photo_dir / "imagenet_00_243.jpg", root / "3_Dress" / "photo.jpg")  # a real colour photo: kept
    with pytest.warns(UserWarning, match="skipping 2 undecodable"):
        scan = scan_image_folder(root)
    assert {Path(p).name for p, _ in scan.skipped} == {victim.name, "notes.jpg"}
    assert len(scan) == 300 - 1 + 1
    assert all(Path(p).name not in {victim.name, "notes.jpg", "readme.txt"} for p, _ in scan.samples)
    # the verdict is cached: a second scan finds the same, and a changed file is checked again
    with pytest.warns(UserWarning):
        assert scan_image_folder(root).skipped == scan.skipped
    victim.write_bytes(good)
    with pytest.warns(UserWarning, match="skipping 1 undecodable"):
        assert len(scan_image_folder(root)) == 301


@pytest.mark.parametrize("make,match", [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "no class sub-folders"),
    (lambda p: (p / "cat").mkdir(parents=True), "holds no image files"),
])
def test_structural_errors_name_the_path(tmp_path, make, match):
    root = tmp_path / "data"
    make(root)
    with pytest.raises(FileNotFoundError, match=match):
        scan_image_folder(root)


def test_all_files_bad_is_an_error(tmp_path):
    (tmp_path / "d" / "cat").mkdir(parents=True)
    (tmp_path / "d" / "cat" / "a.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="no decodable image"):
        scan_image_folder(tmp_path / "d")
