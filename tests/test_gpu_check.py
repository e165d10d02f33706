"""The GPU script rehearsed on the CPU (``bash bench/gpu_check.sh --rehearse``), and its parts.

The rehearsal runs every section of the H200 run at toy sizes (resnet18 at 32 px, batches of 4
and 8, 2 steps a point, gloo instead of NCCL) so that a broken script is found here, not in the
few minutes a GPU is lent. Sections whose feature is missing here (a loader or train.py option not
built yet) must say so and be skipped, never crash the run.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "out"
    work = tmp_path_factory.mktemp("gpu-check-work")
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--rehearse", str(out), "--work", str(work),
                           "--deliver", str(out.parent / "deliver")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1200)
    return out, proc


def test_rehearsal_runs_every_section_and_writes_every_file(rehearsal):
    out, proc = rehearsal
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    doc = json.loads((out / "gpu_check.json").read_text())
    sections = doc["sections"]
    planned = set(gpu_check.SECTIONS) - {"accuracy"} | {"accuracy-calibration"}
    assert planned <= set(sections), sorted(planned - set(sections))
    for name, sec in sections.items():
        # ran to the end, or skipped with a reason that says what is missing; never a timeout or a crash
        assert sec["status"] in ("ok", "skipped"), (name, sec, proc.stdout[-3000:])
        if sec["status"] == "skipped":
            assert sec["reason"], name
    for name in ("env", "data", "model", "e2e-dali", "e2e-torch", "e2e-ffcv", "ddp", "accum", "compile",
                 "e2e-dali-shards", "e2e-torchvision-gpu-shards"):
        assert sections[name]["status"] == "ok", (name, sections[name])
    for name in ("throughput.json", "throughput.csv", "images_per_s.png", "step_time.png", "summary.txt",
                 "env.json", "ddp.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "images_per_s.png").read_bytes()[:4] == b"\x89PNG"
    # what a lent machine sends back: at most 8 files, every log inside details.tar.gz
    import tarfile
    sent = sorted(p.name for p in (out.parent / "deliver").iterdir())
    assert len(sent) <= 8 and "summary.txt" in sent and "throughput.json" in sent and "details.tar.gz" in sent, sent
    with tarfile.open(out.parent / "deliver" / "details.tar.gz") as tar:
        names = tar.getnames()
    assert "gpu-check/logs/model.log" in names and "gpu-check/sections/e2e-dali/throughput.json" in names


def test_rehearsal_figures_are_consistent(rehearsal):
    out, _ = rehearsal
    data = json.loads((out / "throughput.json").read_text())
    rows = data["results"]
    by_section = {}
    for r in rows:
        by_section.setdefault(r["section"], []).append(r)
    model = [r for r in by_section["model"] if r["status"] == "ok"]
    assert {r["batch"] for r in model} == {4, 8}
    for name in ("e2e-dali", "e2e-torch", "e2e-ffcv"):
        ok = [r for r in by_section[name] if r["status"] == "ok"]
        assert ok, name
        for r in ok:
            assert r["images_per_s"] > 0 and r["peak_mem_mb"] > 0 and r["load_start"] is not None
            if "e2e>model" not in r.get("flags", []):  # the stall share is computed against the model section
                assert 0.0 <= r["stall_share"] <= 1.0, r
    for name, loader in (("e2e-dali-shards", "dali"), ("e2e-torchvision-gpu-shards", "torchvision-gpu")):
        ok = [r for r in by_section[name] if r["status"] == "ok"]  # the same photos, read from tar shards
        assert {r["batch"] for r in ok} == {4, 8} and all(r["loader"].startswith(f"{loader}:data=") for r in ok), name
        assert all(r["images_per_s"] > 0 for r in ok)
    assert set(data["headline"]["shards_vs_files_at_8"]) == {"dali", "torchvision-gpu"}
    accum = [r for r in by_section["accum"] if r["status"] == "ok"]
    assert accum and all(r["accum"] == 2 and r["effective_batch"] == 8 for r in accum)
    assert data["headline"]["largest_model_batch_that_fits"] == 8
    ddp = json.loads((out / "ddp.json").read_text())
    assert ddp["backend"] == "gloo" and ddp["ddp_speed"]["images_per_s"]["ddp"] > 0
    assert ddp["sync_bn_vs_bn"]["status"] == "skipped"  # CUDA-only kernels: said, not silently passed


def test_rehearsal_accuracy_run_reports_the_four_scores(rehearsal):
    out, proc = rehearsal
    acc = json.loads((out / "gpu_check.json").read_text())["headline"].get("accuracy")
    assert acc is not None, proc.stdout[-3000:]
    for key in ("random_init_knn", "raw_pixels_knn", "knn", "probe", "raw_pixels_probe", "random_init_probe"):
        assert 0.0 <= acc[key] <= 100.0, key
    assert acc["epochs"] >= 1


def test_missing_loader_or_option_is_skipped_with_a_line(tmp_path):
    run = gpu_check.Run(tmp_path, 60, gpu_check.REHEARSE, rehearse=True)
    run.env = {"loaders": ["torch", "dali", "ffcv"], "modules": {"ffcv": "MISSING: ImportError: no module"},
               "train_options": ["--loader", "--epochs"]}
    assert "not in this version" in gpu_check.loader_available(run, "torchvision-gpu")
    assert "source .kit/install.sh" in gpu_check.loader_available(run, "ffcv:os_cache=0")
    assert gpu_check.loader_available(run, "dali:cpu_decode=1") is None
    assert gpu_check.train_has(run, "--accum") == "train.py has no --accum option yet"
    assert gpu_check.train_has(run, "--epochs") is None


def test_a_section_past_its_limit_is_stopped_and_recorded(tmp_path):
    run = gpu_check.Run(tmp_path, 60, gpu_check.REHEARSE, rehearse=True)
    entry = run.sh("sleepy", [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"], 2)
    assert entry["status"] == "timeout" and entry["wall_s"] < 30
    assert "started" in (tmp_path / entry["log"]).read_text()
    assert json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["sleepy"]["status"] == "timeout"
    run.limit_s = 0  # nothing left: the next section is skipped with a line, not started
    assert run.budget("model") is None
    assert json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["model"]["status"] == "skipped"


def test_fmnist_written_from_idx_files_matches_the_prepared_data_set(fmnist_root, tmp_path):
    from bench.gpu_data import write_fmnist
    from pipeline.datasets import DEBIAN_DIR
    out = write_fmnist(tmp_path / "fm", DEBIAN_DIR, limit=40, workers=2)
    files = sorted(out.rglob("*.jpg"))
    assert len(files) == 80  # the first 40 of each split
    for f in files[::7]:  # same folders, names and bytes as pipeline.datasets.prepare_fashion_mnist
        assert f.read_bytes() == (fmnist_root / f.relative_to(out)).read_bytes()
