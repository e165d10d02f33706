"""Real data preparation: Fashion-MNIST (Debian ``dataset-fashion-mnist``) → ImageFolder of JPEGs.

Fashion-MNIST (Xiao et al., 2017; MIT licence): 70,000 grey 28×28 product photos, 10 balanced
classes, 60,000 train / 10,000 test. Debian's package puts the IDX files in
``/usr/share/datasets/fashion-mnist/``. torchvision's ``FashionMNIST`` checks md5 sums that do not
match Debian's ``.gz`` files (the pixels do match), so the IDX files are read directly here.

Output layout (3-channel JPEG, quality 95)::

    OUT/train/<k>_<class name>/<index>.jpg     60,000 files
    OUT/val/<k>_<class name>/<index>.jpg       10,000 files (the official test split)

Folder names start with the original label ``k`` so that ImageFolder's sorted ``class_to_idx``
reproduces Fashion-MNIST's label numbers. The folder is built beside ``OUT`` and renamed into
place when complete, so an interrupted run leaves no half data set; running again on a complete
folder does nothing.

Progress: a tqdm bar per split when stderr is a terminal; otherwise (``make train > log``) one
line per split when it is written, as the training loop prints one line per epoch.

Command line: ``python -m pipeline.datasets [--out data/fashion-mnist] [--src DIR]``.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
APT_PACKAGE = "dataset-fashion-mnist"
CLASSES = ("T-shirt_top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot")  # labels 0..9, Xiao et al. Table 1
SPLITS = {"train": "train", "val": "t10k"}
_MARKER = ".complete.json"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally ``.gz``) as a uint8 array: images ``(N, 28, 28)``, labels ``(N,)``.

    Raises:
        ValueError: the file is not an unsigned-byte IDX file or is truncated.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f"{path}: too short to be an IDX file")
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {int(np.prod(shape))} bytes of data for shape {shape}, found {body.size}")
    return body.reshape(shape)


def _find(src: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (src / name).exists():
            return src / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}(.gz) not found in {src}. Install it with "
        f"`apt-get install -y {APT_PACKAGE}` (Debian package; puts the files in {DEBIAN_DIR})."
    )


def prepare_fashion_mnist(out: str | os.PathLike, src: str | os.PathLike = DEBIAN_DIR,
                          quality: int = 95, progress: bool = True) -> Path:
    """Write Fashion-MNIST as an ImageFolder of RGB JPEGs under ``out`` (idempotent).

    Args:
        out: the ImageFolder root to create (``train/`` and ``val/`` under it).
        src: folder with the IDX files (``.gz`` or not).
        quality: JPEG quality.
        progress: report progress on stderr: a bar per split when stderr is a terminal, else
            one line per split once it is written (a log file gets lines, not bar refreshes).

    Returns:
        ``Path(out)``.

    Raises:
        FileNotFoundError: the IDX files are missing (the message names the apt package).
        FileExistsError: ``out`` exists but was not written completely by this function.
    """
    out, src = Path(out), Path(src)
    if (out / _MARKER).exists():
        return out
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists but is not a complete prepared data set; remove it and run again")
    arrays = {}
    for split, stem in SPLITS.items():
        images = read_idx(_find(src, f"{stem}-images-idx3-ubyte"))
        labels = read_idx(_find(src, f"{stem}-labels-idx1-ubyte"))
        if len(images) != len(labels):
            raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels in {src}")
        arrays[split] = (images, labels)
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    counts = {}
    show_bar = progress and sys.stderr.isatty()
    for split, (images, labels) in arrays.items():
        for k, name in enumerate(CLASSES):
            (tmp / split / f"{k}_{name}").mkdir(parents=True)
        t0 = time.time()
        for i in tqdm(range(len(images)), desc=f"writing {split} JPEGs", disable=not show_bar, unit="img"):
            k = int(labels[i])
            Image.fromarray(images[i], mode="L").convert("RGB").save(
                tmp / split / f"{k}_{CLASSES[k]}" / f"{i:05d}.jpg", quality=quality)
        counts[split] = len(images)
        if progress and not show_bar:
            print(f"wrote {len(images)} {split} JPEGs in {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
    (tmp / _MARKER).write_text(json.dumps({"source": str(src), "counts": counts, "quality": quality}))
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.rmdir()  # empty, checked above
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Turn Fashion-MNIST (Debian dataset-fashion-mnist) into an ImageFolder of JPEGs.")
    p.add_argument("--out", default="data/fashion-mnist", help="output folder (default: %(default)s)")
    p.add_argument("--src", default=str(DEBIAN_DIR), help="folder with the IDX files (default: %(default)s)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        path = prepare_fashion_mnist(args.out, args.src, args.quality)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        raise SystemExit(f"error: {exc}")
    print(f"Fashion-MNIST ImageFolder ready at {path}/train and {path}/val")


if __name__ == "__main__":
    main()
