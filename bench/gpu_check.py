"""The prepared GPU run (``bench/gpu_check.sh``): every figure of issue 9's claim in one timed script.

    bash bench/gpu_check.sh OUT_DIR               # on a lent H200, after `source .kit/install.sh`
    bash bench/gpu_check.sh --rehearse OUT_DIR    # the same sections on the CPU at toy sizes (CI runs it)

Sections, in this order, each a subprocess with its own time limit (seconds, :data:`SECTIONS`),
inside one overall limit (``--limit-s``, default 470 s: the issue's 8 minutes less a margin). A
section that cannot start with its minimum left is skipped with a line saying so; a section whose
feature is missing here (a loader not installed, a ``train.py`` option not there yet) is skipped
with a line naming it. ``OUT_DIR/gpu_check.json`` is rewritten after every section, so a run cut
short keeps what it measured.

1. ``env``: ``nvidia-smi``, versions, whether DALI, FFCV and each loader import (``env.json``).
2. ``data``: generated photo-sized JPEGs (500×375, ImageNet-like), the same photos as tar shards
   (``python -m pipeline.shards write``, 64 a shard, with DALI indexes), and Fashion-MNIST from its
   IDX files (``--fmnist-src``; carried to the GPU host: 31 MB).
3. ``model``: model-only (synthetic views on the GPU), resnet50 224 px bf16 channels-last, batch
   64 → 2048: the ceiling, peak memory and the largest batch that fits.
4. ``e2e-<loader>``: end to end for ``dali`` (nvJPEG ``mixed``), ``ffcv``, ``torch``,
   ``torchvision-gpu`` and ``dali:cpu_decode=1``, against section 3's model-only (stall %); then
   ``e2e-dali-shards`` and ``e2e-torchvision-gpu-shards``: the same photos read from the tar shards
   (DALI ``mixed`` through ``fn.readers.webdataset``; tar bytes into nvJPEG), at batch 64, 256 and
   1024, against the same model-only and beside the file rows (``shards_vs_files`` in the headline).
5. ``ddp``: ``torchrun --nproc-per-node=1 bench/ddp_check.py``: SyncBN = BN on channels-last bf16
   input, DDP's images/s within 5% of one process (NCCL; gloo in the rehearsal).
6. ``accum``: ``--accum 4`` at batch 1024, a global batch of 4096 (model-only and end to end).
7. ``variants``: FFCV with ``os_cache`` off and ``quasi_random`` order, DALI's hardware-decoder
   share 0.9 and 1.0, at batch 256.
8. ``compile``: model-only with ``--compile`` at batch 256 (compile time in ``first_step_s``).
   Sections 7 and 8 start only while they leave 150 s for:
9. ``accuracy``: ``train.py`` resnet18 small stem, 32 px Fashion-MNIST, ``--loader dali``: one
   calibration epoch, then as many epochs as fit in what is left of 3 minutes; kNN and linear
   probe against random init and raw pixels (train.py prints all four).
10. ``train-cli``: ``train.py`` as users launch it, on synthetic views: one process, ``torchrun
    --nproc-per-node=1 ... --sync-bn``, and ``--accum 4`` (skipped with a line while train.py has no
    such option); images/s of each (when time is left).

Finally ``OUT_DIR`` gets the merged ``throughput.json`` / ``throughput.csv`` (every point, with its
section), ``images_per_s.png``, ``step_time.png``, ``gpu_check.json`` (sections, headline figures)
and ``summary.txt``; the table is printed once.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

# name: (time limit s, minimum s to start it). Sections finish early when they can; the limits are
# the worst case, and the accuracy run takes what is left of its 3 minutes.
SECTIONS = {
    "env": (40, 5), "data": (45, 10), "model": (45, 20),
    "e2e-dali": (40, 15), "e2e-ffcv": (60, 30), "e2e-torch": (40, 15), "e2e-torchvision-gpu": (35, 15),
    "e2e-dali-cpu-decode": (35, 15), "e2e-dali-shards": (30, 15), "e2e-torchvision-gpu-shards": (30, 15),
    "ddp": (30, 15), "accum": (30, 15), "variants": (45, 20),
    "compile": (75, 45), "accuracy": (200, 60), "train-cli": (60, 30),
}
SET_UP_S = 10  # a throughput.py section stops starting points this long before its limit (start-up, report)
# Sections after "accum" start only while they leave the accuracy run this much of the overall limit.
ACCURACY_RESERVE = {"variants": 150, "compile": 150}
# The rehearsal checks the script, not speed, on 2 shared cores: every section gets room.
REHEARSE_SECTIONS = {name: (max(90, limit), least) for name, (limit, least) in SECTIONS.items()}
REHEARSE_SECTIONS["accuracy"] = (240, 60)

GPU = dict(device="cuda", arch="resnet50", image_size=224, amp="bf16", small_stem=False, dim=2048, pred_dim=512,
           batches=[64, 128, 256, 512, 1024], model_batches=[64, 128, 256, 512, 1024, 2048], ffcv_batches=[64, 256, 1024],
           variant_batch=256, accum=(1024, 4), compile_batch=256, photos=4096, photo_size=(500, 375),
           shard_size="64", shard_batches=[64, 256, 1024],
           timing=["--warmup", "2", "--repeats", "2", "--min-images", "512", "--min-steps", "2"],
           ddp=["-a", "resnet50", "--image-size", "224", "-b", "256", "--steps", "8", "--repeats", "3", "--warmup", "3"],
           acc=dict(batch=512, lr=0.03, wd=5e-4, seconds=180, limit=None, knn_bank=10000, workers=8, dim=2048, pred_dim=512),
           fmnist_limit=None)
REHEARSE = dict(device="cpu", arch="resnet18", image_size=32, amp="bf16", small_stem=False, dim=128, pred_dim=32,
                batches=[4, 8], model_batches=[4, 8], ffcv_batches=[8], variant_batch=8, accum=(4, 2), compile_batch=4,
                photos=32, photo_size=(160, 120), shard_size="4", shard_batches=[4, 8],
                timing=["--warmup", "0", "--repeats", "2", "--min-images", "0", "--min-steps", "1", "--remeasure", "0"],
                ddp=["-a", "resnet18", "--image-size", "16", "--dim", "64", "--pred-dim", "16", "-b", "4", "--steps", "1",
                     "--repeats", "2", "--warmup", "1"],
                # the accuracy run in float32: bf16 autocast on a CPU without AVX-512 BF16 (this project's 2-core
                # AMD EPYC machine) took 90 s a step of resnet18 small stem at 32 px against 7 s in float32
                acc=dict(batch=32, lr=0.03, wd=5e-4, seconds=45, limit=160, knn_bank=160, workers=1, dim=128, pred_dim=32,
                         amp="off"),
                fmnist_limit=160)


# The files a lent machine sends back (at most 8): these 7 plus details.tar.gz.
DELIVERED = ("gpu_check.json", "summary.txt", "throughput.json", "throughput.csv", "images_per_s.png", "step_time.png",
             "ddp.json")


class Run:
    """Section bookkeeping: the overall clock, per-section logs and ``gpu_check.json``."""

    def __init__(self, out: Path, limit_s: float, profile: dict, rehearse: bool, deliver: Path | None = None):
        self.out, self.limit_s, self.p, self.rehearse, self.deliver_to = out, limit_s, profile, rehearse, deliver
        self.t0 = time.monotonic()
        self.sections: dict[str, dict] = {}
        self.env: dict = {}
        self.headline: dict = {}
        out.mkdir(parents=True, exist_ok=True)
        (out / "logs").mkdir(exist_ok=True)

    def left(self) -> float:
        return self.limit_s - (time.monotonic() - self.t0)

    def save(self) -> None:
        doc = {"rehearse": self.rehearse, "limit_s": self.limit_s, "elapsed_s": round(time.monotonic() - self.t0, 1),
               "profile": {k: v for k, v in self.p.items() if k != "timing"}, "env": self.env,
               "sections": self.sections, "headline": self.headline}
        (self.out / "gpu_check.json").write_text(json.dumps(doc, indent=1, default=str))
        if self.deliver_to is not None:
            self.deliver()

    def deliver(self) -> None:
        """Copy what a lent machine sends back (at most 8 files there) into ``deliver_to``: the merged
        results and plots once they exist, ``gpu_check.json``, and ``details.tar.gz`` holding every
        log, per-section result and environment file; refreshed after every section."""
        import shutil
        import tarfile
        d = self.deliver_to
        d.mkdir(parents=True, exist_ok=True)
        for name in DELIVERED:
            if (self.out / name).is_file():
                shutil.copy(self.out / name, d / name)
        tmp = d / ".details.tar.gz.tmp"
        with tarfile.open(tmp, "w:gz") as tar:  # checkpoints (100+ MB) stay behind: logs and figures only
            tar.add(self.out, arcname="gpu-check",
                    filter=lambda info: None if info.name.endswith((".pth", ".pt")) else info)
        tmp.rename(d / "details.tar.gz")

    def skip(self, name: str, why: str) -> None:
        print(f"== {name}: skipped ({why})", flush=True)
        self.sections[name] = {"status": "skipped", "reason": why}
        self.save()

    def budget(self, name: str) -> float | None:
        """This section's time limit now, or None (and a 'skipped' line) when too little time is left."""
        limit, least = (REHEARSE_SECTIONS if self.rehearse else SECTIONS)[name]
        left = self.left() - 5  # keep a few seconds for the report
        reserve = 0 if self.rehearse else ACCURACY_RESERVE.get(name, 0)
        if reserve and left - reserve < least:
            self.skip(name, f"{max(left, 0):.0f} s left, of which {reserve} s are kept for the accuracy run")
            return None
        left -= reserve
        if left < least:
            self.skip(name, f"{max(left, 0):.0f} s left of the {self.limit_s:.0f} s limit, {least} s needed")
            return None
        return min(limit, left)

    def sh(self, name: str, cmd: list[str], limit: float, env: dict | None = None, show: str | None = None) -> dict:
        """Run ``cmd`` (its own process group, killed at ``limit`` s), output to the terminal and
        ``logs/<name>.log``; records the section and returns its entry."""
        log = self.out / "logs" / f"{name}.log"
        print(f"== {name} (limit {limit:.0f} s): {show or ' '.join(shlex.quote(c) for c in cmd)}", flush=True)
        t0 = time.monotonic()
        base = {"PYTHONUNBUFFERED": "1"}
        if self.rehearse:
            # one intra-op thread: on shared, oversubscribed cores OpenMP's spinning threads make each
            # step up to 10x slower (measured here: 3.4-6 s vs 0.37 s a step at load 8 on 2 cores)
            base["OMP_NUM_THREADS"] = "1"
        with open(log, "wb") as f:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    start_new_session=True, env={**os.environ, **base, **(env or {})})
            copier = threading.Thread(target=_copy, args=(proc.stdout, f), daemon=True)
            copier.start()
            timed_out = False
            try:
                proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                if proc.poll() is None:
                    _kill(proc)
                copier.join(timeout=10)
        entry = {"status": "timeout" if timed_out else ("ok" if proc.returncode == 0 else "failed"),
                 "rc": proc.returncode, "wall_s": round(time.monotonic() - t0, 1), "limit_s": round(limit, 1),
                 "log": str(log.relative_to(self.out)), "cmd": cmd}
        if timed_out:
            print(f"== {name}: stopped at its {limit:.0f} s limit (partial results kept)", flush=True)
        elif proc.returncode != 0:
            print(f"== {name}: exit {proc.returncode} (log {log})", flush=True)
        self.sections[name] = entry
        self.save()
        return entry


def _copy(stream, f) -> None:
    """Copy a child's output to ``f`` and to this process's stdout as it comes (raw chunks, so a
    progress bar without a newline never blocks the time limit)."""
    while True:
        chunk = os.read(stream.fileno(), 65536)
        if not chunk:
            return
        f.write(chunk)
        f.flush()
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()


def _kill(proc: subprocess.Popen) -> None:
    """SIGINT the process group (partial JSON gets written), then SIGKILL after 10 s."""
    for sig, wait in ((signal.SIGINT, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


# ------------------------------------------------------------------------------------------ sections

ENV_PROBE = r'''
import importlib, importlib.metadata, json, os, sys
import torch
info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "cpus": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)), "loadavg": os.getloadavg()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_mb=p.total_memory // 2**20,
                capability=".".join(map(str, torch.cuda.get_device_capability(0))), cudnn=torch.backends.cudnn.version())
mods = {}
for name in ("torchvision", "numpy", "PIL", "psutil", "matplotlib", "sklearn", "nvidia.dali", "ffcv", "numba", "cupy"):
    try:
        m = importlib.import_module(name)
        try:  # the installed distribution's version (FFCV's own __version__ string lags its releases)
            mods[name] = importlib.metadata.version({"PIL": "pillow", "sklearn": "scikit-learn",
                                                      "nvidia.dali": "nvidia-dali-cuda130"}.get(name, name))
        except importlib.metadata.PackageNotFoundError:
            mods[name] = getattr(m, "__version__", "?")
    except Exception as e:
        mods[name] = f"MISSING: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
info["modules"] = mods
import pipeline
info["loaders"] = list(pipeline.LOADERS)
help_text = __import__("subprocess").run([sys.executable, "train.py", "--help"], capture_output=True, text=True).stdout
info["train_options"] = sorted(set(__import__("re").findall(r"--[a-z][a-z0-9-]+", help_text)))
print(json.dumps(info))
'''


def section_env(run: Run) -> None:
    limit = run.budget("env")
    if limit is None:
        return
    if not run.rehearse:
        text = []
        for cmd in (["nvidia-smi"], ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.sm,"
                                     "clocks.max.sm,temperature.gpu,power.draw,power.limit,persistence_mode",
                                     "--format=csv"]):
            try:  # read-only queries; the card's settings are left as found
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
                text.append(r.stdout + r.stderr)
            except (OSError, subprocess.TimeoutExpired) as exc:
                text.append(f"{' '.join(cmd)}: {exc}\n")
        (run.out / "nvidia-smi.txt").write_text("\n".join(text))
        print("\n".join(text), flush=True)
    entry = run.sh("env", [PY, "-c", ENV_PROBE], limit, show="python -c <environment probe: versions, imports, loaders>")
    log = (run.out / entry["log"]).read_text().strip().splitlines()
    try:
        run.env = json.loads(log[-1])
    except (IndexError, ValueError):
        run.env = {"error": "the environment probe failed; see logs/env.log"}
    (run.out / "env.json").write_text(json.dumps(run.env, indent=1))
    run.save()


def section_data(run: Run, args) -> tuple[Path | None, Path | None, Path | None]:
    """Photos, their tar shards and Fashion-MNIST: ``(photos, shards, fmnist)``, None for what is not there."""
    limit = run.budget("data")
    if limit is None:
        return None, None, None
    photos = Path(args.work) / "photos"
    w, h = run.p["photo_size"]
    workers = str(max(1, (os.cpu_count() or 2)))
    cmds = [[PY, "bench/gpu_data.py", "photos", str(photos), "--n", str(run.p["photos"]), "--width", str(w),
             "--height", str(h), "--workers", workers]]
    # the same photos as tar shards: the writer reads an ImageFolder root (<root>/train/<class>/...)
    root, shards = Path(args.work) / "photo-root", Path(args.work) / "photo-shards"
    shard_cmd = ["mkdir", "-p", str(root), "&&", "ln", "-sfn", str(photos), str(root / "train"), "&&", "{", "test",
                 "-f", str(shards / "train.json"), "||", PY, "-m", "pipeline.shards", "write", str(root), str(shards),
                 "--shard-size", run.p["shard_size"], "--ranks", "1", "--workers", workers, ";", "}"]
    fm = None
    src = Path(args.fmnist_src) if args.fmnist_src else None
    if src is not None and src.is_dir():
        fm = Path(args.work) / "fashion-mnist"
        cmd = [PY, "bench/gpu_data.py", "fmnist", str(fm), "--src", str(src), "--workers", workers]
        if run.p["fmnist_limit"]:
            cmd += ["--limit", str(run.p["fmnist_limit"])]
        cmds.append(cmd)
    else:
        print(f"== data: no Fashion-MNIST IDX files at {src} (--fmnist-src): the accuracy section will be skipped")
    script = " && ".join(" ".join(shlex.quote(c) for c in cmd) for cmd in cmds)
    script += " && " + " ".join(c if c in ("&&", "||", "{", "}", ";") else shlex.quote(c) for c in shard_cmd)
    entry = run.sh("data", ["bash", "-c", script], limit)
    if entry["status"] != "ok":
        return None, None, None
    return photos, (shards if (shards / "train.json").is_file() else None), fm


def throughput_cmd(run: Run, out: Path, stages: str, data: Path | None, batches: list[int], loaders: str | None = None,
                   extra: list[str] | None = None) -> list[str]:
    p = run.p
    cmd = [PY, "bench/throughput.py", "--device", p["device"], "--arch", p["arch"], "--image-size", str(p["image_size"]),
           "--amp", p["amp"], "--channels-last", "--dim", str(p["dim"]), "--pred-dim", str(p["pred_dim"]),
           "--stages", stages, "--batch-sizes", ",".join(map(str, batches)), "--out", str(out), "--budget-s", "0",
           *p["timing"]]
    if p["small_stem"]:
        cmd.append("--small-stem")
    if data is not None:
        cmd += ["--data", str(data), "--num-images", str(p["photos"]),
                "--workers", str(max(1, (os.cpu_count() or 2) - 2)) if not run.rehearse else "1"]
    if loaders:
        cmd += ["--loaders", loaders]
    return cmd + (extra or [])


def section_throughput(run: Run, name: str, stages: str, data, batches, loaders=None, extra=None) -> None:
    limit = run.budget(name)
    if limit is None:
        return
    out = run.out / "sections" / name
    cmd = throughput_cmd(run, out, stages, data, batches, loaders, extra) + ["--time-limit-s", str(max(5, limit - SET_UP_S))]
    env = {}
    if run.rehearse and "ffcv" in (loaders or ""):
        env["NUMBA_DISABLE_JIT"] = "1"  # FFCV's pipeline uncompiled: 40-80 s of numba per loader saved on 2 cores
    if run.rehearse and "--compile" in (extra or []):
        env["TORCHDYNAMO_DISABLE"] = "1"  # the --compile path runs eagerly: compiling takes minutes on 2 cores
    run.sh(name, cmd, limit, env)
    run.sections[name]["results"] = str((out / "throughput.json").relative_to(run.out))
    if env:
        run.sections[name]["rehearsal_env"] = env
    run.save()


def loader_available(run: Run, loader: str) -> str | None:
    """None when ``loader`` (a spec's name) is a loader of this version whose package imported in ``env``."""
    name = loader.split(":")[0]
    known = run.env.get("loaders")
    if known is not None and name not in known:
        return f"--loader {name} is not in this version of pipeline.LOADERS ({', '.join(known)})"
    mods = run.env.get("modules", {})
    need = {"dali": "nvidia.dali", "ffcv": "ffcv"}.get(name)
    if need and str(mods.get(need, "")).startswith("MISSING"):
        return f"{need} does not import here ({mods[need]}); on the GPU host: source .kit/install.sh first"
    return None


def train_has(run: Run, *options: str) -> str | None:
    """None when train.py offers every option, else the missing ones."""
    have = set(run.env.get("train_options", []))
    missing = [o for o in options if o not in have]
    return None if not missing or not have else f"train.py has no {', '.join(missing)} option yet"


def section_accuracy(run: Run, fm: Path | None) -> None:
    """Calibrate one epoch, then as many epochs as fit in what is left of ``acc.seconds``."""
    if fm is None:
        run.skip("accuracy", "no Fashion-MNIST data (see the data section)")
        return
    why = loader_available(run, "dali")
    if why:
        run.skip("accuracy", why)
        return
    limit = run.budget("accuracy")
    if limit is None:
        return
    a = run.p["acc"]
    base = [PY, "train.py", "--data", str(fm), "--loader", "dali", "--device", run.p["device"], "-a", "resnet18",
            "--small-stem", "--image-size", "32", "-b", str(a["batch"]), "--lr", str(a["lr"]), "--wd", str(a["wd"]),
            "--proj-layers", "2", "--dim", str(a["dim"]), "--pred-dim", str(a["pred_dim"]), "--amp", a.get("amp", run.p["amp"]),
            "--channels-last", "-j", str(a["workers"]), "--knn-bank", str(a["knn_bank"]), "--no-progress", "--seed", "0"]
    if a["limit"]:
        base += ["--subset", str(a["limit"]), "--knn-queries", str(a["knn_bank"])]
    t_start = time.monotonic()
    calib = run.out / "sections" / "accuracy-calibration"
    entry = run.sh("accuracy-calibration", base + ["--epochs", "1", "--out", str(calib)], min(limit, 90 + 60 * run.rehearse))
    if entry["status"] != "ok":
        run.skip("accuracy", "the one-epoch calibration run did not finish (logs/accuracy-calibration.log)")
        return
    history = json.loads((calib / "history.json").read_text())
    t1 = entry["wall_s"]
    n_train = a["limit"] or 60000
    train_s = n_train / history[-1]["images_per_s"]
    per_epoch = 1.1 * train_s + max(1.0, 0.25 * (t1 - train_s))  # training + its epoch's kNN/probe/checkpoint
    fixed = max(0.0, t1 - per_epoch)  # start-up, random-init and raw-pixel scores
    left = min(a["seconds"] - (time.monotonic() - t_start), limit - (time.monotonic() - t_start) - 5)
    epochs = int((left - fixed) // per_epoch)
    plan = {"calibration_wall_s": t1, "train_s_per_epoch": round(train_s, 2), "est_s_per_epoch": round(per_epoch, 2),
            "est_fixed_s": round(fixed, 1), "seconds_left": round(left, 1), "epochs": epochs}
    print(f"== accuracy: calibration {t1:.0f} s (epoch training {train_s:.1f} s); {epochs} epoch(s) fit in {left:.0f} s",
          flush=True)
    if epochs < 2:
        run.sections["accuracy-calibration"]["plan"] = plan
        run.skip("accuracy", f"only {epochs} epoch(s) fit in the {left:.0f} s left; the calibration run's one epoch "
                             f"is the result")
        _accuracy_headline(run, calib / "history.json", 1)
        return
    out = run.out / "sections" / "accuracy"
    entry = run.sh("accuracy", base + ["--epochs", str(epochs), "--out", str(out)], max(10, left + 10))
    entry["plan"] = plan
    _accuracy_headline(run, out / "history.json", epochs)
    run.save()


def section_train_cli(run: Run) -> None:
    """train.py itself, as a user launches it (``--loader synthetic``, one short epoch each): one
    process; ``torchrun --nproc-per-node=1 ... --sync-bn`` (DDP); ``--accum 4`` reaching 4 × the
    per-step batch. Images/s from each run's ``history.json``; missing options are named and skipped."""
    limit = run.budget("train-cli")
    if limit is None:
        return
    p = run.p
    b, n = p["accum"]
    common = ["--loader", "synthetic", "--device", p["device"], "-a", p["arch"], "--image-size", str(p["image_size"]),
              "--amp", p["amp"], "--channels-last", "--dim", str(p["dim"]), "--pred-dim", str(p["pred_dim"]),
              "--epochs", "1", "--no-knn", "--no-progress", "--synthetic-size", str(b * n * (3 if run.rehearse else 6))]
    torchrun = [PY, "-m", "torch.distributed.run", "--nproc-per-node=1", "--standalone"]
    runs = {"single": [PY, "train.py", *common, "-b", str(b)],
            "torchrun-sync-bn": torchrun + ["train.py", *common, "-b", str(b), "--sync-bn"]}
    missing = train_has(run, "--accum")
    if missing is None:
        runs["accum"] = [PY, "train.py", *common, "-b", str(b * n), "--accum", str(n)]
    results, t0 = {}, time.monotonic()
    for name, cmd in runs.items():
        left = limit - (time.monotonic() - t0)
        if left < 10:
            results[name] = {"status": "skipped", "reason": "section time limit"}
            continue
        out = run.out / "sections" / f"train-cli-{name}"
        entry = run.sh(f"train-cli-{name}", cmd + ["--out", str(out)], left)
        hist = out / "history.json"
        ips = json.loads(hist.read_text())[-1].get("images_per_s") if hist.exists() else None
        results[name] = {"status": entry["status"], "images_per_s": ips}
    if missing:
        results["accum"] = {"status": "skipped", "reason": missing}
        print(f"== train-cli-accum: skipped ({missing})", flush=True)
    single, ddp = results["single"].get("images_per_s"), results.get("torchrun-sync-bn", {}).get("images_per_s")
    run.sections["train-cli"] = {"status": "ok" if all(r["status"] in ("ok", "skipped") for r in results.values())
                                 else "failed", "runs": results,
                                 "ddp_over_single": (ddp / single) if single and ddp else None}
    run.headline["train_cli"] = run.sections["train-cli"]
    run.save()


def _accuracy_headline(run: Run, history_path: Path, epochs: int) -> None:
    if not history_path.exists():
        return
    h = json.loads(history_path.read_text())
    first, last = h[0], h[-1]
    run.headline["accuracy"] = {
        "epochs": epochs, "random_init_knn": first.get("knn_top1"), "random_init_probe": first.get("probe_top1"),
        "raw_pixels_knn": first.get("pixels_knn_top1"), "raw_pixels_probe": first.get("pixels_probe_top1"),
        "knn": last.get("knn_top1"), "probe": last.get("probe_top1"), "images_per_s": last.get("images_per_s"),
        "history": str(history_path.relative_to(run.out))}
    run.save()


# ------------------------------------------------------------------------------------------ report

def merged_rows(run: Run) -> tuple[list[dict], dict | None]:
    """Every throughput row of every section (with its ``section``), and one config for the CSV."""
    rows, config = [], None
    for name, sec in run.sections.items():
        path = run.out / sec.get("results", "-")
        if not sec.get("results") or not path.exists():
            continue
        data = json.loads(path.read_text())
        config = config or data["config"]
        for r in data["results"]:
            rows.append({**r, "section": name, "compile": data["config"].get("compile", False)})
    return rows, config


def shards_vs_files(at: dict) -> dict:
    """End-to-end images/s from shards over from files, per loader, from the rows ``at`` one batch
    (keyed by loader spec; a shard series is ``<loader>:data=<shards>``)."""
    out = {}
    for spec, row in at.items():
        name, _, rest = spec.partition(":")
        if rest.startswith("data=") and name in at and at[name].get("images_per_s"):
            out[name] = round(row["images_per_s"] / at[name]["images_per_s"], 3)
    return out


def report(run: Run) -> None:
    from bench.report import plot_step_time, plot_throughput, table, write_csv, write_json
    from bench.throughput import add_stall_shares
    rows, config = merged_rows(run)
    if not rows:
        print("no throughput figures were measured")
        run.save()
        return
    plain = [r for r in rows if r["section"] not in ("compile", "accum")]
    ref = [r for r in rows if r["stage"] == "model"]
    add_stall_shares([r for r in plain if r["stage"] == "e2e"], [r for r in plain if r["stage"] == "model"])
    add_stall_shares([r for r in rows if r["section"] == "accum"])
    model = {r["effective_batch"]: r for r in plain if r["stage"] == "model" and r["status"] == "ok"}
    fits = [r["effective_batch"] for r in ref if r["status"] == "ok" and r["section"] == "model"]
    ooms = [r["effective_batch"] for r in ref if r["status"] == "oom"]
    b = 256 if not run.rehearse else run.p["variant_batch"]
    at = {r["loader"]: r for r in plain if r["stage"] == "e2e" and r["batch"] == b and r["status"] == "ok"}
    run.headline.update({
        "largest_model_batch_that_fits": max(fits) if fits else None, "smallest_oom_batch": min(ooms) if ooms else None,
        f"model_only_images_per_s_at_{b}": model.get(b, {}).get("images_per_s"),
        f"e2e_at_{b}": {k: {"images_per_s": r["images_per_s"], "stall_share": r.get("stall_share"),
                            "flags": r.get("flags", [])} for k, r in at.items()},
        "flagged_points": sum(1 for r in rows if r.get("flags")),
        f"shards_vs_files_at_{b}": shards_vs_files(at)})
    env = {"device": run.p["device"], **{k: run.env.get(k) for k in ("gpu", "torch", "python", "cuda", "cudnn")},
           "modules": run.env.get("modules")}
    cfg = dict(config or {}, sections=list(run.sections))
    write_json(run.out / "throughput.json", env, cfg, rows, {"headline": run.headline})
    write_csv(run.out / "throughput.csv", cfg, rows)
    title = f"{run.p['arch']} {run.p['image_size']}px {run.p['amp']} channels-last on {run.env.get('gpu') or run.p['device']}"
    series = [dict(r, loader=r["loader"] + (" (compile)" if r["section"] == "compile" else "")) for r in rows
              if r["section"] != "accum"]
    plot_throughput(run.out / "images_per_s.png", series, title)
    plot_step_time(run.out / "step_time.png", [r for r in plain if r["stage"] in ("model", "e2e")], title)
    text = table(rows)
    lines = [text, ""]
    for k, v in run.headline.items():
        lines.append(f"{k}: {json.dumps(v, default=str)}")
    for name, sec in run.sections.items():
        lines.append(f"section {name}: {sec['status']}" + (f" ({sec.get('reason')})" if sec.get("reason") else "")
                     + (f" {sec.get('wall_s')} s" if sec.get("wall_s") is not None else ""))
    (run.out / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines), flush=True)
    run.save()


# ------------------------------------------------------------------------------------------ main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", default="bench/results/gpu-check", help="output folder (everything)")
    p.add_argument("--rehearse", action="store_true", help="the same sections on the CPU at toy sizes")
    p.add_argument("--limit-s", type=float, default=None, help="overall time limit (default 470; rehearsal 900)")
    p.add_argument("--only", default=None, help="comma list of sections to run (env and data always run)")
    p.add_argument("--fmnist-src", default=None,
                   help="folder of Fashion-MNIST's IDX .gz files (default: .gpu-data/fashion-mnist, else Debian's "
                        "/usr/share/datasets/fashion-mnist)")
    p.add_argument("--deliver", default=None,
                   help="also keep this folder up to date with the few files a lent machine sends back "
                        "(DELIVERED + details.tar.gz), e.g. --deliver \"$OUT\"")
    p.add_argument("--work", default=None, help="scratch folder for generated data (default /tmp/simsiam-gpu-check)")
    a = p.parse_args(argv)
    if a.fmnist_src is None:
        for cand in (ROOT / ".gpu-data" / "fashion-mnist", Path("/usr/share/datasets/fashion-mnist")):
            if cand.is_dir():
                a.fmnist_src = str(cand)
                break
    a.work = a.work or ("/tmp/simsiam-gpu-check" + ("-rehearse" if a.rehearse else ""))
    a.limit_s = a.limit_s or (900.0 if a.rehearse else 470.0)
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    profile = REHEARSE if args.rehearse else GPU
    run = Run(Path(args.out), args.limit_s, profile, args.rehearse, Path(args.deliver) if args.deliver else None)
    only = set(args.only.split(",")) if args.only else None
    want = lambda name: only is None or name in only  # noqa: E731
    print(f"gpu_check{' --rehearse' if args.rehearse else ''}: {run.out}, limit {args.limit_s:.0f} s", flush=True)
    rc = 3
    try:
        rc = sections(run, args, want)
    finally:  # whatever happened, the figures measured so far are merged, plotted and delivered
        report(run)
        failed = [n for n, s in run.sections.items() if s["status"] == "failed"]
        print(f"gpu_check: done in {time.monotonic() - run.t0:.0f} s; results in {run.out}"
              + (f"; failed sections: {', '.join(failed)}" if failed else ""), flush=True)
    return rc


def sections(run: Run, args, want) -> int:
    """Run the sections in order (see the module docstring); returns the exit status."""
    section_env(run)
    if not args.rehearse and not run.env.get("cuda_available"):
        run.skip("all", "no CUDA device visible to torch: nothing to measure (use --rehearse on a CPU)")
        return 2
    photos, shards, fm = section_data(run, args)
    p = run.p
    if want("model"):
        section_throughput(run, "model", "model", None, p["model_batches"])
    model_json = run.out / "sections" / "model" / "throughput.json"
    ref = ["--reference", str(model_json)] if model_json.exists() else []
    e2e = [("e2e-dali", "dali", p["batches"]), ("e2e-ffcv", "ffcv:write_mode=jpg", p["ffcv_batches"]),
           ("e2e-torch", "torch", p["batches"]), ("e2e-torchvision-gpu", "torchvision-gpu", p["batches"]),
           ("e2e-dali-cpu-decode", "dali:cpu_decode=1", p["batches"])]
    for name, spec, batches in e2e:
        if not want(name):
            continue
        why = "no photos (see the data section)" if photos is None else loader_available(run, spec)
        if why:
            run.skip(name, why)
            continue
        section_throughput(run, name, "e2e", photos, batches, spec, ref)
    for name, loader in (("e2e-dali-shards", "dali"), ("e2e-torchvision-gpu-shards", "torchvision-gpu")):
        if not want(name):
            continue  # the same photos from tar shards, beside the file rows above
        why = "no photo shards (see the data section)" if shards is None else loader_available(run, loader)
        if why:
            run.skip(name, why)
            continue
        section_throughput(run, name, "e2e", photos, p["shard_batches"], f"{loader}:data={shards}", ref)
    if want("ddp"):
        limit = run.budget("ddp")
        if limit is not None:
            dev = "cuda" if p["device"] == "cuda" else "cpu"
            torchrun = [PY, "-m", "torch.distributed.run", "--nproc-per-node=1", "--standalone"]
            run.sh("ddp", torchrun + ["bench/ddp_check.py", "--out", str(run.out / "ddp.json"), "--device", dev,
                                      "--amp", p["amp"], *p["ddp"]], limit)
            ddp = run.out / "ddp.json"
            if ddp.exists():
                doc = json.loads(ddp.read_text())
                checks = {k: doc.get(k, {}).get("status") for k in ("sync_bn_vs_bn", "ddp_speed")}
                run.headline["ddp"] = dict(checks, ratio=doc.get("ddp_speed", {}).get("ratio"))
                # a check that fails is a finding, reported in the headline; the section itself ran
                sec = run.sections["ddp"]
                if sec["status"] == "failed" and sec["rc"] == 1 and all(checks.values()):
                    sec.update(status="ok", checks=checks)
                run.save()
    if want("accum"):
        b, n = p["accum"]
        best = next((s for s in ("dali", "torchvision-gpu", "torch") if not loader_available(run, s)), "torch")
        if photos is None:
            run.skip("accum", "no photos")
        else:
            section_throughput(run, "accum", "model,e2e", photos, [b], best,
                               ["--accum", str(n), "--warmup", "1", "--min-steps", "1"])
    if want("variants"):
        specs = [s for s in ("ffcv:write_mode=jpg:os_cache=0", "ffcv:write_mode=jpg:order=quasi_random:os_cache=0",
                             "dali:hw_decoder_load=0.9", "dali:hw_decoder_load=1.0") if not loader_available(run, s)]
        if photos is None or not specs:
            run.skip("variants", "no photos or neither FFCV nor DALI here")
        else:
            section_throughput(run, "variants", "e2e", photos, [p["variant_batch"]], ",".join(specs), ref)
    if want("compile"):
        section_throughput(run, "compile", "model", None, [p["compile_batch"]], None,
                           ["--compile", "--warmup", "2"])
    if want("accuracy"):
        section_accuracy(run, fm)
    if want("train-cli"):
        section_train_cli(run)
    return 1 if any(s["status"] == "failed" for s in run.sections.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
