"""Loaders leave the caller's process as they found it (issue 11, items 3 and 5).

Each backend runs in a fresh Python process (so nothing imported or started by other tests
counts) on 20 real photos (foolbox's ImageNet JPEGs, 512×512), batch 4: 5 batches per epoch. The
child sets torch's thread count to 3 (neither the CPU count nor the loaders' worker count, so a
library that sets either is seen), then records ``torch.get_num_threads()`` after importing the
backend, writing FFCV's ``.beton``, building the loader and iterating it; then it runs 30 epochs
broken off after 2 batches (3 left: FFCV's prefetch depth, where its epoch thread used to be left
waiting forever) and records the thread count, the worker processes and the RSS after the 5th and
the 30th (and that no finished child process is left unreaped). Buffers of 512 px photos make a leaked iterator cost megabytes, so a leak per epoch
shows in the RSS; the margin is generous, because the point is no growth per epoch.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, threading
import psutil, torch
torch.set_num_threads(3)
backend, data, work = sys.argv[1:4]
seen = {}
def note(stage):
    seen[stage] = torch.get_num_threads()
def state():
    me = psutil.Process()
    kids = me.children(recursive=True)
    return {"threads": me.num_threads(), "py_threads": threading.active_count(), "children": len(kids),
            "zombies": sum(k.status() == psutil.STATUS_ZOMBIE for k in kids), "rss_mib": me.memory_info().rss / 2**20}
from pipeline import build_loader, recipe
from pipeline.sources.imagefolder import scan_image_folder
images = scan_image_folder(data)
kw = dict(aug=recipe(32), batch_size=4, workers=2, seed=0)
if backend == "torch":
    note("import")
    loader = build_loader("torch", images, **kw)
elif backend == "dali":
    note("import")
    loader = build_loader("dali", images, **kw)
else:
    import pipeline.backends.ffcv.loader, pipeline.backends.ffcv.write
    from pipeline.backends.ffcv.runtime import import_ffcv
    import_ffcv()
    note("import")
    from pipeline.backends.ffcv.write import check_beton, write_beton
    beton = write_beton(images, work + "/photos.beton", num_workers=2, progress=False)
    note("write")
    check_beton(beton)
    note("check")
    loader = build_loader("ffcv", beton, **kw)
note("build")
batches = 0
for epoch in range(2):
    loader.set_epoch(epoch)
    for b in loader:
        batches += 1
        note("iterate")
note("after_epochs")
states = {}
for epoch in range(30):
    loader.set_epoch(epoch)
    for k, b in enumerate(loader):
        if k == 1:
            break
    note("after_break")
    if epoch in (4, 29):
        states[epoch] = state()
print(json.dumps({"threads": seen, "batches": batches, "states": states}))
"""


@pytest.fixture(scope="module")
def photos(photo_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hygiene") / "train" / "photos"
    root.mkdir(parents=True)
    for p in sorted(photo_dir.glob("imagenet_*.jpg")):
        (root / p.name).write_bytes(p.read_bytes())
    return root.parent


@pytest.mark.parametrize("backend", ["torch", "dali", "ffcv"])
def test_threads_kept_and_early_breaks_release_everything(backend, photos, tmp_path):
    pytest.importorskip({"torch": "torch", "dali": "nvidia.dali", "ffcv": "ffcv"}[backend])
    run = subprocess.run([sys.executable, "-c", CHILD, backend, str(photos), str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["batches"] == 10
    # import, (write, check,) build, every batch, after the epochs and after every early break: still 3
    assert set(out["threads"].values()) == {3}, out["threads"]
    first, last = out["states"]["4"], out["states"]["29"]
    assert last["threads"] == first["threads"] and last["py_threads"] == first["py_threads"], (first, last)
    # torch: its 2 persistent DataLoader workers; FFCV: Python's shared-memory resource tracker
    assert last["children"] == first["children"] == {"torch": 2, "dali": 0, "ffcv": 1}[backend], (first, last)
    assert last["zombies"] == 0, last  # FFCV's writer processes are reaped
    assert last["rss_mib"] - first["rss_mib"] < 40, (first, last)  # a leaked FFCV iterator here: ~30 MiB each
