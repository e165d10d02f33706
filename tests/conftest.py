"""Shared real-data fixtures.

- ``fmnist_root``: the full Fashion-MNIST ImageFolder (``train/``, ``val/``), prepared from Debian's
  ``dataset-fashion-mnist`` once into ``$SIMSIAM_TEST_DATA`` (default
  ``~/.cache/simsiam-fast/test-data``) and reused by later sessions (preparation is idempotent and
  deterministic); 70,000 files per session in pytest's temp folders made its clean-up slow.
- ``fmnist_slice``: a small ImageFolder copied from it: ``per_class`` train and val images per
  class (default 30 → 300 + 300 files).
- ``photo_dir``: foolbox's data folder (20 real ImageNet JPEGs, CIFAR/MNIST PNGs), read as files.
- ``photo_folder``: an ImageFolder of real colour photos: the 20 foolbox ImageNet JPEGs in two
  classes by file index parity, plus scikit-learn's two sample photos.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from pipeline.datasets import DEBIAN_DIR, prepare_fashion_mnist

# The image-check cache of pipeline.sources.imagefolder goes to a throw-away folder, not the user's ~/.cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="simsiam-test-cache-")


def copy_slice(src_root: Path, dst_root: Path, per_class: int) -> Path:
    """Copy the first ``per_class`` files of each class of each split under ``src_root`` to ``dst_root``."""
    for split in ("train", "val"):
        for cls in sorted((src_root / split).iterdir()):
            if not cls.is_dir():
                continue
            out = dst_root / split / cls.name
            out.mkdir(parents=True)
            for f in sorted(cls.iterdir())[:per_class]:
                shutil.copy(f, out / f.name)
    return dst_root


@pytest.fixture(scope="session")
def fmnist_root() -> Path:
    if not (DEBIAN_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.fail("Fashion-MNIST is missing: apt-get install -y dataset-fashion-mnist (the README's test command does)")
    base = Path(os.environ.get("SIMSIAM_TEST_DATA", Path.home() / ".cache" / "simsiam-fast" / "test-data"))
    return prepare_fashion_mnist(base / "fashion-mnist", progress=False)


@pytest.fixture(scope="session")
def fmnist_slice(fmnist_root, tmp_path_factory) -> Path:
    return copy_slice(fmnist_root, tmp_path_factory.mktemp("fmnist_slice"), per_class=30)


@pytest.fixture(scope="session")
def photo_dir() -> Path:
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the foolbox wheel is missing: pip install --no-deps foolbox (the README's test command does)")
    return Path(spec.submodule_search_locations[0]) / "data"


@pytest.fixture(scope="session")
def photo_folder(photo_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos") / "train"
    for f in sorted(photo_dir.glob("imagenet_*.jpg")):
        cls = root / ("even" if int(f.name.split("_")[1]) % 2 == 0 else "odd")
        cls.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, cls / f.name)
    sk = importlib.util.find_spec("sklearn")
    if sk is not None:
        for f in (Path(sk.submodule_search_locations[0]) / "datasets" / "images").glob("*.jpg"):
            shutil.copy(f, root / "even" / f"sklearn_{f.name}")
    return root
