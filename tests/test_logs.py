"""A log a person reads: the data preparation prints lines, not progress-bar refreshes, when
stderr is not a terminal (``make train > log``), and still draws its bar on a terminal."""
import fcntl
import gzip
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np

from pipeline.datasets import DEBIAN_DIR, SPLITS, read_idx

REPO = Path(__file__).resolve().parents[1]
COUNTS = {"train": 400, "val": 100}


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as a gzipped IDX file, the format of Debian's Fashion-MNIST files."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + np.ascontiguousarray(array, np.uint8).tobytes()))


def small_source(root: Path) -> Path:
    """The first images of each real Fashion-MNIST split, as IDX files the preparation reads."""
    root.mkdir()
    for split, stem in SPLITS.items():
        n = COUNTS[split]
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
            write_idx(root / f"{stem}-{kind}.gz", read_idx(DEBIAN_DIR / f"{stem}-{kind}.gz")[:n])
    return root


def prepare_command(src: Path, out: Path) -> list[str]:
    """The data preparation's command line (``python -m pipeline.datasets``) from ``src`` to ``out``."""
    return [sys.executable, "-m", "pipeline.datasets", "--src", str(src), "--out", str(out)]


def test_preparation_in_a_log_file_is_one_line_per_split(tmp_path):
    src = small_source(tmp_path / "src")
    log = tmp_path / "log"
    with open(log, "w") as f:
        res = subprocess.run(prepare_command(src, tmp_path / "out"), cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                             timeout=120)
    assert res.returncode == 0
    text = log.read_text()
    assert "\r" not in text  # no bar refreshes
    lines = text.splitlines()
    assert len(lines) == 3, text
    assert lines[0].startswith(f"wrote {COUNTS['train']} train JPEGs in ") and lines[0].endswith(" s")
    assert lines[1].startswith(f"wrote {COUNTS['val']} val JPEGs in ")
    assert lines[2].startswith("Fashion-MNIST ImageFolder ready at")
    assert sum(1 for _ in (tmp_path / "out" / "train").rglob("*.jpg")) == COUNTS["train"]
    assert sum(1 for _ in (tmp_path / "out" / "val").rglob("*.jpg")) == COUNTS["val"]


def test_preparation_on_a_terminal_draws_its_bar(tmp_path):
    src = small_source(tmp_path / "src")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    try:
        proc = subprocess.Popen(prepare_command(src, tmp_path / "out"), cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=slave)
        os.close(slave)
        chunks = []
        while True:  # read while it runs: a full pty buffer would block the child
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert proc.wait(timeout=120) == 0
    finally:
        os.close(master)
    shown = b"".join(chunks).decode(errors="replace")
    assert "writing train JPEGs" in shown and "writing val JPEGs" in shown and "\r" in shown
    assert f"{COUNTS['train']}/{COUNTS['train']}" in shown
    assert "wrote " not in shown  # the lines are for logs only
