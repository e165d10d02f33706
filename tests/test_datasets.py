"""Fashion-MNIST preparation and the ImageFolder scan on real files."""
import gzip
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.datasets import CLASSES, DEBIAN_DIR, prepare_fashion_mnist, read_idx
from pipeline.sources.imagefolder import scan_image_folder


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
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no decodable image"):
        scan_image_folder(tmp_path / "d")


def bad_folder(photo_dir: Path, root: Path) -> Path:
    """Two real photos plus every kind of file the scan must skip, each for its own reason."""
    cls = root / "c"
    cls.mkdir(parents=True)
    photos = sorted(photo_dir.glob("imagenet_*.jpg"))
    for p in photos[:2]:
        shutil.copy(p, cls / p.name)
    data = photos[2].read_bytes()
    (cls / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (cls / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8)
    (cls / "empty.jpg").write_bytes(b"")
    (cls / "notes.png").write_text("a text file with an image extension\n")
    (cls / "dangling.jpg").symlink_to(root / "nowhere.jpg")
    os.mkfifo(cls / "pipe.jpg")  # reading it would block forever: the scan must not open it
    Image.new("1", (20000, 10000)).save(cls / "bomb.png")  # 200 Mpixel: over PIL's decompression-bomb limit
    return root


def test_every_bad_file_skipped_with_its_reason_and_listed(photo_dir, tmp_path):
    from pipeline.sources.imagefolder import write_skip_list
    root = bad_folder(photo_dir, tmp_path / "train")
    with pytest.warns(UserWarning, match=r"skipping 7 undecodable file\(s\)") as caught:
        images = scan_image_folder(root)
    assert "and 2 more" in str(caught[0].message)  # the first five are named, then the count
    assert [Path(p).name for p, _ in images.samples] == sorted(p.name for p in sorted(photo_dir.glob("imagenet_*.jpg"))[:2])
    assert images.kinds == ["JPEG/RGB", "JPEG/RGB"]
    reasons = {Path(p).name: r for p, r in images.skipped}
    assert set(reasons) == {"truncated.jpg", "corrupt.jpg", "empty.jpg", "notes.png", "dangling.jpg", "pipe.jpg", "bomb.png"}
    assert "truncated" in reasons["truncated.jpg"] and reasons["empty.jpg"] == "empty file (0 bytes)"
    assert reasons["pipe.jpg"] == "not a regular file" and "FileNotFoundError" in reasons["dangling.jpg"]
    assert "DecompressionBombError" in reasons["bomb.png"] and "UnidentifiedImageError" in reasons["notes.png"]
    listed = write_skip_list([images, images.subset(1, 0)], tmp_path / "skipped.txt").read_text().splitlines()
    assert len(listed) == 14 and listed[:7] == [f"{p}\t{r}" for p, r in images.skipped]
    assert write_skip_list(scan_image_folder(root, verify=False), tmp_path / "none.txt").read_text() == ""
    with pytest.raises(ValueError, match=r"7 file\(s\) under .* do not decode: .*corrupt\.jpg.*and 2 more"):
        scan_image_folder(root, on_bad="error")
    with pytest.raises(ValueError, match="on_bad"):
        scan_image_folder(root, on_bad="ignore")


def test_unreadable_file_is_skipped_and_checked_again(photo_dir, tmp_path, monkeypatch):
    """chmod 000 does not stop root, who runs the tests here: the open is refused by a patch
    instead, with the error a non-root reader gets (PermissionError, errno EACCES)."""
    import builtins
    import errno
    root = tmp_path / "train"
    (root / "c").mkdir(parents=True)
    photos = sorted(photo_dir.glob("imagenet_*.jpg"))[:3]
    for p in photos:
        shutil.copy(p, root / "c" / p.name)
    locked = root / "c" / photos[0].name
    locked.chmod(0)
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):
        if os.fspath(file) == str(locked):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", refusing_open)
    with pytest.warns(UserWarning, match="skipping 1 undecodable.*PermissionError"):
        assert len(scan_image_folder(root)) == 2
    monkeypatch.setattr(builtins, "open", real_open)
    locked.chmod(0o644)  # chmod leaves size and mtime alone: only not caching OS errors finds it readable
    assert len(scan_image_folder(root)) == 3
