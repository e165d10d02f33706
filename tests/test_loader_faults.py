"""Loaders under a stop signal and with an unwritable cache, as a cluster and a shared machine do it.

- A SIGTERM to the whole process group (Slurm, ``kill -TERM -PGID``, torchrun's agent) passes the
  helper processes by: DataLoader workers keep delivering, FFCV's writer processes are stopped by
  their parent; a SIGTERM from the parent (``Process.terminate()``, how Python's exit stops daemonic
  workers) still ends a worker, so a process whose loader outlives ``main`` still exits.
- With ``XDG_CACHE_HOME`` unwritable, a loader that must cache says one line with the way out.
  (That every loader trains when it has nothing to cache is what ``tests/test_soak.py`` runs under.)

Signals go to real process groups of subprocesses started in their own session, never to pytest's.
"""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from PIL import Image

from pipeline import build_loader, recipe
from pipeline.sources.imagefolder import scan_image_folder

ROOT = Path(__file__).resolve().parents[1]


def start(code: str, *args) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"hung: {err[-2000:]}")
    return proc.returncode, out, err


def group_is_empty(pgid: int, within: float = 15.0) -> bool:
    end = time.time() + within
    while time.time() < end:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


DATALOADER = """
    import gc, os, signal, subprocess, sys, time
    import torch
    from torch.utils.data import DataLoader, Dataset
    from pipeline.workers import ignore_stop_signals, stop_signals_deferred

    class Slow(Dataset):
        def __len__(self):
            return 400
        def __getitem__(self, i):
            time.sleep(0.005)
            return i

    got = []
    signal.signal(signal.SIGTERM, lambda s, f: got.append(s))  # the trainer's part: note it, go on
    loader = DataLoader(Slow(), batch_size=10, num_workers=2, persistent_workers=True, worker_init_fn=ignore_stop_signals)
    with stop_signals_deferred():
        it = iter(loader)
    batches = [next(it) for _ in range(3)]
    # the whole group, this process and both workers, from another process (as a shell's or Slurm's kill)
    subprocess.run([sys.executable, "-c", f"import os; os.killpg({os.getpgrp()}, {int(signal.SIGTERM)})"])
    batches += list(it)
    print(len(batches), len(got), flush=True)
    keep = [iter(loader)]  # workers alive, iterator in a cycle: only the exit's terminate() stops them
    keep.append(keep)
    gc.disable()
"""


def test_dataloader_workers_survive_a_group_sigterm_and_still_end_with_their_parent():
    proc = start(DATALOADER)
    code, out, err = finish(proc, timeout=120)
    assert code == 0, err[-3000:]
    assert out.split() == ["40", "1"], err[-3000:]  # every batch delivered after the signal; the parent saw it
    assert "killed by signal" not in err
    assert group_is_empty(proc.pid), "a worker outlived its parent"


def test_a_sigterm_to_the_group_while_a_beton_is_written_stops_its_writers(fmnist_root, tmp_path):
    pytest.importorskip("ffcv")
    out = tmp_path / "val.beton"
    proc = start("""
        import sys
        from pipeline.backends.ffcv.write import main
        sys.exit(main(sys.argv[1:]))
    """, fmnist_root / "val", out, "-j", "2")
    try:
        parent = psutil.Process(proc.pid)
        end = time.time() + 120
        while len([c for c in parent.children() if "resource_tracker" not in " ".join(c.cmdline())]) < 2:
            assert time.time() < end and proc.poll() is None, "the writer processes never started"
            time.sleep(0.1)
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGTERM)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    code, _, err = finish(proc, timeout=60)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert err.strip().splitlines()[-1] == f"stopped by SIGTERM: nothing written to {out}"
    assert "Traceback" not in err
    assert not list(tmp_path.iterdir())  # no .beton, no temporary file, no sidecar
    assert group_is_empty(proc.pid)


@pytest.fixture
def unwritable_cache(tmp_path, monkeypatch):
    """XDG_CACHE_HOME where no folder can be made: a regular file stands in the way (for any user)."""
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    return blocker / "simsiam-fast"


def test_dali_that_must_cache_png_copies_says_so_in_one_line_with_the_way_out(fmnist_slice, tmp_path, unwritable_cache):
    pytest.importorskip("nvidia.dali")

    split = tmp_path / "mixed"
    for cls in ("a", "b"):
        (split / cls).mkdir(parents=True)
        for i, f in enumerate(sorted(next((fmnist_slice / "train").iterdir()).iterdir())[:4]):
            (split / cls / f.name).write_bytes(f.read_bytes())
    gif = split / "a" / "gif_named.jpg"
    Image.new("P", (8, 8)).save(gif, format="GIF")  # PIL decodes it, DALI does not: it needs a PNG copy
    os.environ["XDG_CACHE_HOME"], saved = str(tmp_path / "scan-cache"), os.environ["XDG_CACHE_HOME"]
    images = scan_image_folder(split)
    os.environ["XDG_CACHE_HOME"] = saved
    with pytest.raises(OSError) as info:
        build_loader("dali", images, recipe(16), batch_size=2)
    assert str(info.value).startswith(f"--loader dali must cache PNG copies of files DALI does not decode (such as "
                                      f"{gif}) in {unwritable_cache / 'dali-png'}, which cannot be written (")
    assert str(info.value).endswith("); set XDG_CACHE_HOME to a writable folder")
    assert "\n" not in str(info.value)


@pytest.mark.skipif(os.geteuid() != 0, reason="a read-only mount needs root")
def test_ffcv_that_must_cache_a_beton_says_so_in_one_line_with_the_way_out(fmnist_slice, tmp_path, unwritable_cache):
    pytest.importorskip("ffcv")

    data = tmp_path / "ro"
    data.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(data)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        subprocess.run(["cp", "-r", str(fmnist_slice / "train"), str(data)], check=True)
        subprocess.run(["mount", "-o", "remount,ro", str(data)], check=True)  # no .ffcv/ beside the split
        images = scan_image_folder(data / "train")
        with pytest.raises(OSError) as info:
            build_loader("ffcv", images, recipe(16), batch_size=8)
    finally:
        subprocess.run(["umount", str(data)], capture_output=True)
    message = str(info.value)
    assert message.startswith(f"--loader ffcv must cache a .beton of {data / 'train'} in {unwritable_cache / 'ffcv'}, "
                              f"which cannot be written ("), message
    assert message.endswith("); set XDG_CACHE_HOME to a writable folder, or give --ffcv-beton PATH (a .beton to read, "
                            "or where to write one)") and "\n" not in message
