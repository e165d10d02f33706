"""Nothing grows: 40 short epochs of every loader, its process measured after each epoch.

Each loader runs in its own process (``tests/soak.py``: the loader alone, built as ``train.py``
builds it on the CPU, 3 batches of 32 per epoch (96 images of a slice); DALI builds a new pipeline
every epoch, FFCV compiles once). From epoch 10 on, threads, open file descriptors and child
processes must not change at all, and resident memory may not rise by more than
:data:`RSS_BOUND_MIB` (allocator noise; one leaked batch per epoch would be ~0.2 MiB x 30).
The five run at once, with ``XDG_CACHE_HOME`` where no folder can be made: every loader has
nothing to cache here and must train anyway (the FFCV ``.beton`` is written beside the results).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOADERS = ("torch", "dali", "ffcv", "torchvision-gpu", "synthetic")
EPOCHS, FROM = 40, 10
RSS_BOUND_MIB = 8.0


@pytest.fixture(scope="module")
def soaked(fmnist_slice, tmp_path_factory):
    out = tmp_path_factory.mktemp("soak")
    blocker = out / "cache-is-a-file"
    blocker.write_text("")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(blocker)}
    procs = {}
    for loader in LOADERS:
        procs[loader] = subprocess.Popen(
            [sys.executable, "tests/soak.py", loader, str(fmnist_slice / "train"), str(out / f"{loader}.json"),
             "--epochs", str(EPOCHS)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {}
    try:
        for loader, proc in procs.items():
            _, err = proc.communicate(timeout=400)
            results[loader] = (proc.returncode, err, out / f"{loader}.json")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


@pytest.mark.parametrize("loader", LOADERS)
def test_forty_epochs_grow_nothing(soaked, loader):
    if loader in ("dali", "ffcv"):
        pytest.importorskip({"dali": "nvidia.dali", "ffcv": "ffcv"}[loader])
    code, err, path = soaked[loader]
    assert code == 0, err[-3000:]
    rows = json.loads(path.read_text())["epochs"]
    assert len(rows) == EPOCHS and all(r["batches"] == rows[0]["batches"] > 0 for r in rows)
    steady = rows[FROM - 1:]
    for key in ("threads", "fds", "children"):
        assert {r[key] for r in steady} == {steady[0][key]}, (key, [r[key] for r in rows])
    rss = [r["rss_mib"] for r in steady]
    assert max(rss) - rss[0] < RSS_BOUND_MIB, [round(r["rss_mib"], 1) for r in rows]
