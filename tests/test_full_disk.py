"""A real full disk: tmpfs filesystems of a chosen size, mounted for the test (root only).

Each write the trainer makes (a checkpoint, the backbone, a TensorBoard event, ``history.json`` or
``curves.png``, a ``.beton``) fails with the kernel's own ``ENOSPC`` here, not with a patched call:
the run must say so in one line that names the file and the free space, leave the previous file
intact and no temporary file, and exit non-zero. The training runs are ``train.py`` subprocesses
with the tiny model of ``tests/test_interrupt.py``; the filesystem sizes are set from the sizes of
a checkpoint and a backbone of a run on an ordinary folder.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--loader", "torch", "--image-size", "8", "--small-stem", "--dim", "64", "--pred-dim", "16", "-b", "40", "-j", "0",
        "--no-knn", "--log-every", "2", "--epochs", "2"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@pytest.fixture
def small_fs(tmp_path):
    """``small_fs(bytes)``: a fresh tmpfs of that size, unmounted when the test ends."""
    mounts = []

    def mount(size: int) -> Path:
        where = tmp_path / f"fs{len(mounts)}"
        where.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, text=True, timeout=30)
        if res.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        if subprocess.run(["umount", str(where)], capture_output=True, timeout=30).returncode:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


def train(args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def data(fmnist_root, tmp_path_factory):
    from conftest import copy_slice
    return copy_slice(fmnist_root, tmp_path_factory.mktemp("disk_data"), per_class=20)


@pytest.fixture(scope="module")
def sizes(data, tmp_path_factory):
    """Bytes of a checkpoint and of a backbone file of the tiny model (from a run on a normal folder)."""
    out = tmp_path_factory.mktemp("sizes") / "run"
    res = train(["--data", str(data), "--out", str(out), *TINY[:-2], "--epochs", "1"])
    assert res.returncode == 0, res.stderr[-2000:]
    return (out / "checkpoint.pth").stat().st_size, (out / "backbone_resnet18.pth").stat().st_size


def one_error_line(res) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: could not write "), res.stderr[-3000:]
    return lines[0]


def no_temporary_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if ".tmp" in p.name]


def test_the_first_checkpoint_on_a_full_disk(data, sizes, small_fs):
    ckpt, _ = sizes
    out = small_fs(ckpt // 2)
    line = one_error_line(train(["--data", str(data), "--out", str(out), *TINY]))
    assert line.startswith(f"error: could not write checkpoint {out / 'checkpoint.pth'}: No space left on device")
    assert f"free of {ckpt // 2 / 2**20:.1f} MiB on {out}" in line and "no earlier checkpoint exists" in line
    assert not (out / "checkpoint.pth").exists() and no_temporary_files(out)


def test_the_backbone_on_a_full_disk_keeps_the_checkpoint(data, sizes, small_fs):
    ckpt, backbone = sizes
    out = small_fs(ckpt + backbone // 2)
    line = one_error_line(train(["--data", str(data), "--out", str(out), *TINY]))
    path = out / "backbone_resnet18.pth"
    assert line.startswith(f"error: could not write backbone {path}: No space left on device [errno 28]"), line
    assert "MiB free of" in line
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 1  # written before, intact
    assert not path.exists() and no_temporary_files(out)


def test_a_later_checkpoint_on_a_full_disk_keeps_the_previous_one(data, sizes, small_fs):
    ckpt, backbone = sizes
    out = small_fs(ckpt + backbone + ckpt // 2)  # epoch 1 fits; epoch 2's checkpoint does not fit beside it
    line = one_error_line(train(["--data", str(data), "--out", str(out), *TINY]))
    assert line.startswith(f"error: could not write checkpoint {out / 'checkpoint.pth'}: No space left on device")
    assert f"the previous checkpoint {out / 'checkpoint.pth'} is intact" in line
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 1
    assert no_temporary_files(out)
    res = train(["--data", str(data), "--out", str(out), "--resume", "auto", *TINY[:-2], "--epochs", "1"])
    assert res.returncode == 0 and "after epoch 1" in res.stdout, res.stderr[-2000:]  # it still resumes


def test_history_and_plot_files_are_replaced_whole_or_not_at_all(small_fs):
    from model.plots import plot_run
    from pipeline.writes import WriteFailed, atomic_write_text

    out = small_fs(256 * 1024)
    atomic_write_text(out / "history.json", "[]", "history")
    filler = out / "filler"
    with pytest.raises(OSError):
        with open(filler, "wb") as f:  # fill the filesystem to the last byte
            while True:
                f.write(b"\0" * 4096)
                f.flush()
    with pytest.raises(WriteFailed) as info:
        atomic_write_text(out / "history.json", "[" + "1," * 100_000 + "1]", "history")
    assert str(info.value).startswith(f"could not write history {out / 'history.json'}: No space left on device")
    assert str(info.value).endswith(f"the previous history {out / 'history.json'} is intact")
    assert (out / "history.json").read_text() == "[]" and no_temporary_files(out)
    with pytest.raises(WriteFailed, match=f"could not write plot {out / 'curves.png'}: No space left on device"):
        plot_run([{"epoch": 0}], [[1, -0.5, 0.02]], out / "curves.png", 64, 5)
    assert not (out / "curves.png").exists() and no_temporary_files(out)


def test_tensorboard_on_a_full_disk_names_its_event_file_without_a_thread_traceback(small_fs, capfd):
    from model.run_log import TensorBoard
    from pipeline.writes import WriteFailed

    out = small_fs(64 * 1024)
    tb = TensorBoard(out / "tb")
    with pytest.raises(WriteFailed) as info:
        for step in range(100_000):
            tb.add_scalar("train/loss", 0.5, step)
            if step % 500 == 0:
                tb.flush()
    event_file = next((out / "tb").iterdir())
    assert str(info.value).startswith(f"could not write TensorBoard log {event_file}: No space left on device")
    tb.close()  # nothing more is tried
    assert "Traceback" not in capfd.readouterr().err


def test_a_beton_on_a_full_disk_stops_its_writer_processes_and_names_the_file(data, small_fs):
    pytest.importorskip("ffcv")
    import multiprocessing as mp

    from pipeline.backends.ffcv.write import write_beton
    from pipeline.writes import WriteFailed

    out = small_fs(4 * 2**20)  # FFCV writes 8 MiB pages: the first page does not fit
    with pytest.raises(WriteFailed) as info:
        write_beton(data / "train", out / "train.beton", num_workers=2, progress=False)
    assert str(info.value).startswith(f"could not write FFCV file {out / 'train.beton'}: No space left on device")
    assert "MiB free of 4.0 MiB" in str(info.value)
    assert not list(out.iterdir())  # no .beton, no temporary file, no sidecar
    assert not mp.active_children()  # the writer processes are gone (FFCV's own would wait forever)
