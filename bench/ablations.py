"""The paper's findings in one command: short SimSiam runs of its ablations, one table, one plot.

    python bench/ablations.py --quick      # 960 Fashion-MNIST images, 16 px, 7 × 240 steps: ~10 min on 2 cores
    python bench/ablations.py              # 9,600 images, 16 px, 7 × 1,500 steps (each step twice --quick's batch)
    python bench/ablations.py --ci --data DIR   # a tiny slice, 8 px, small heads: the test suite's run

Each variant is ``train.main(argv)`` run in this process with one change from the paper's ImageNet
recipe (``--recipe imagenet``, the one its ablations used; no blur at these sizes, as measured)
(Chen & He, CVPR 2021, 100-epoch ImageNet linear accuracy in brackets):

=====================  ========================  ===================================================
variant                train.py flags            the paper
=====================  ========================  ===================================================
default                (none)                    learns; z-std stays ≈ 1/√dim (Fig. 2: 67.7%)
no stop-gradient       ``--no-stop-grad``        collapses: loss → −1, z-std → 0, kNN at chance
                                                 (§4.1, Fig. 2: 0.1%)
identity predictor     ``--predictor identity``  collapses (§4.2, Tab. 1a: 0.1%)
fixed random predictor ``--predictor fixed``     does not learn (§4.2, Tab. 1b: 1.5%)
predictor lr decayed   ``--no-fix-pred-lr``      learns, not better than a fixed predictor lr
                                                 (§4.2, Tab. 1c: 67.7% decayed vs 68.1% fixed)
asymmetric loss        ``--no-symmetric``        learns, a bit worse (§4.6: 64.8% vs 68.1%)
cross-entropy          ``--similarity            learns, a bit worse (§4.5: 63.2% vs 68.1%)
similarity             cross-entropy``
=====================  ========================  ===================================================

Each row of the table reports what the run measured (final loss and z-std: medians of the last 20
steps; the collapse warning of :mod:`model.collapse` replayed on the recorded curve; kNN top-1 on
val at random init and at the end) and whether the paper's expectation held, in words, whatever
the outcome. Short CPU runs are far from the paper's 100 ImageNet epochs: the verdicts say what this
run shows, not whether the paper is right. Outputs in ``--out``: ``ablations.md`` (the table),
``ablations.json``, ``ablations.csv``, ``ablations.png`` (loss, z-std with the 1/√dim line, kNN top-1
per variant) and each run's folder under ``runs/`` (its ``curves.png``, history and checkpoint).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402
from model.collapse import first_warning  # noqa: E402
from model.plots import plot_run, plot_study  # noqa: E402
from pipeline.sources.imagefolder import scan_image_folder  # noqa: E402

# The paper ran its ablations with its ImageNet recipe; without blur (as these runs were measured:
# train.py's default dropped it at <= 64 px before the recipes were named).
RECIPE = ["--recipe", "imagenet", "--blur-p", "0", "--loader", "torch"]  # the loader its results were measured with
# train.py options per preset, after RECIPE; every variant adds its flags to these.
PRESETS = {
    "quick": ["--subset", "960", "--image-size", "16", "-b", "32", "--lr", "0.8", "--epochs", "8",
              "--knn-queries", "5000"],
    "full": ["--subset", "9600", "--image-size", "16", "-b", "64", "--lr", "0.4", "--epochs", "10",
             "--knn-queries", "5000"],
    "ci": ["--image-size", "8", "--small-stem", "--dim", "128", "--pred-dim", "32", "-b", "32", "--lr", "1.6",
           "--epochs", "2", "-j", "0"],
}
TAIL = 20  # steps whose medians give the final loss and z-std


@dataclass(frozen=True)
class Variant:
    """One ablation: its name, its train.py flags, the paper's expectation and its source."""

    key: str
    name: str
    flags: tuple[str, ...]
    expectation: str
    source: str


VARIANTS = (
    Variant("default", "default", (), "learns; z-std stays near 1/√dim; no collapse warning", "Fig. 2: 67.7%"),
    Variant("no-stop-grad", "no stop-gradient", ("--no-stop-grad",),
            "collapses: loss → −1, z-std → 0, kNN near chance", "§4.1, Fig. 2: 0.1%"),
    Variant("identity-predictor", "identity predictor", ("--predictor", "identity"),
            "collapses like no stop-gradient", "§4.2, Tab. 1a: 0.1%"),
    Variant("fixed-predictor", "fixed random predictor", ("--predictor", "fixed"),
            "does not learn", "§4.2, Tab. 1b: 1.5%"),
    Variant("pred-lr-decayed", "predictor lr decayed", ("--no-fix-pred-lr",),
            "learns; not better than the fixed predictor lr (default)", "§4.2, Tab. 1c: 67.7% vs 68.1%"),
    Variant("asymmetric", "asymmetric loss", ("--no-symmetric",),
            "learns, a bit worse than symmetric", "§4.6: 64.8% vs 68.1%"),
    Variant("cross-entropy", "cross-entropy similarity", ("--similarity", "cross-entropy"),
            "learns, a bit worse than cosine", "§4.5: 63.2% vs 68.1%"),
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="960 images, 16 px, 240 steps per variant (~10 min on 2 cores)")
    mode.add_argument("--ci", action="store_true", help="a tiny run for the test suite (use a small --data)")
    p.add_argument("--data", default=train.DEFAULT_DATA, help="ImageFolder root with train/ and val/")
    p.add_argument("--variants", default=",".join(v.key for v in VARIANTS),
                   help="comma-separated subset of: " + ", ".join(v.key for v in VARIANTS))
    p.add_argument("--out", default=None, help="output folder (default bench/results/ablations-<time>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("train_args", nargs=argparse.REMAINDER,
                   help="after --: more train.py options for every variant (e.g. -- --epochs 4 --amp bf16)")
    args = p.parse_args(argv)
    known = {v.key for v in VARIANTS}
    chosen = [k for k in args.variants.split(",") if k]
    unknown = [k for k in chosen if k not in known]
    if unknown or not chosen:
        p.error(f"unknown variant(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(sorted(known))}")
    args.variants = [v for v in VARIANTS if v.key in chosen]
    args.train_args = [a for a in args.train_args if a != "--"]
    args.preset = "ci" if args.ci else "quick" if args.quick else "full"
    return args


def measure(summary: dict, run_dir: Path, similarity: str) -> dict:
    """What one run shows, from its summary and its checkpoint's per-step curve."""
    state = torch.load(run_dir / "checkpoint.pth", map_location="cpu", weights_only=True)
    curve = summary.get("curve") or state.get("curve", [])
    dim = int(state["args"]["dim"])
    history = summary["history"]
    tail = curve[-TAIL:]
    evals = [h for h in history if "knn_top1" in h]
    warning = first_warning(curve, dim, similarity)
    return {
        "dim": dim,
        "steps": len(curve),
        "final_loss": statistics.median(r[1] for r in tail) if tail else math.nan,
        "z_std_ratio": statistics.median(r[2] for r in tail) * math.sqrt(dim) if tail else math.nan,
        "warning_step": warning[0] if warning else None,
        "knn_init": evals[0]["knn_top1"] if evals and evals[0]["epoch"] == 0 else math.nan,
        "knn_final": evals[-1]["knn_top1"] if evals else math.nan,
        "minutes": summary["minutes"],
        "similarity": similarity,
        "history": history,
        "curve": curve,
    }


def noise_points(accuracy: float, queries: int) -> float:
    """kNN differences below this many points are called noise: two standard errors of the
    difference of two accuracies of ``accuracy`` percent, each measured on ``queries`` images
    (binomial, taken as independent), and never under 1 point. Seed-to-seed training noise comes on top."""
    p = min(max(accuracy / 100, 0.0), 1.0)
    return max(1.0, 2 * math.sqrt(2) * 100 * math.sqrt(p * (1 - p) / max(1, queries)))


def verdict(key: str, m: dict, default: dict | None, chance: float, noise: float) -> tuple[str, str]:
    """``(status, sentence)``: did the paper's expectation hold in this run? status is ``held``,
    ``partly``, ``not held`` or ``within noise`` (a kNN difference under ``noise`` points).

    Collapse = the collapse warning fired; "near chance" = final kNN within 10 points of ``chance``;
    "does not learn" = under half the default's kNN gain over the random init; "learns" = over half
    of it without a collapse warning; "a bit worse" = below the default by more than ``noise``.
    """
    gain = m["knn_final"] - m["knn_init"]
    collapse = m["warning_step"] is not None  # model.collapse's criterion on the recorded curve
    facts = (f"loss {m['final_loss']:+.3f}, z-std {m['z_std_ratio']:.2f}/√dim, "
             f"{'warning at step ' + str(m['warning_step']) if m['warning_step'] is not None else 'no warning'}, "
             f"kNN {m['knn_init']:.1f}% → {m['knn_final']:.1f}%")
    if key == "default":
        ok = m["warning_step"] is None and m["z_std_ratio"] > 0.65 and gain > 0
        return ("held" if ok else "not held"), f"{facts}: {'learned without collapse' if ok else 'did not learn cleanly'}"
    if default is None:
        return "n/a", f"{facts} (no default run to compare with)"
    d_final, d_gain = default["knn_final"], default["knn_final"] - default["knn_init"]
    if key in ("no-stop-grad", "identity-predictor"):
        near_chance = m["knn_final"] < chance + 10
        if collapse and near_chance:
            return "held", f"{facts}: collapsed and kNN fell to near chance ({chance:.0f}%)"
        if collapse:
            return "partly", (f"{facts}: the output collapsed, but kNN stayed {m['knn_final'] - chance:.0f} points above "
                              f"chance ({chance:.0f}%): after {m['steps']} steps the backbone still holds features "
                              f"(the paper's 0.1% is after 100 ImageNet epochs)")
        return "not held", f"{facts}: no collapse within {m['steps']} steps"
    if key == "fixed-predictor":
        ok = gain < 0.5 * d_gain if d_gain > 0 else gain <= 0
        return ("held" if ok else "not held"), (f"{facts}: gained {gain:+.1f} kNN points vs the default's {d_gain:+.1f}"
                                                f"{'' if ok else ': it learned'}")
    diff = m["knn_final"] - d_final
    if key == "pred-lr-decayed":
        if abs(diff) <= noise:
            return "within noise", f"{facts}: {diff:+.1f} points vs the default, within ±{noise:.1f} (the paper's gap is 0.4)"
        return ("held" if diff < 0 else "not held"), f"{facts}: {diff:+.1f} points vs the default (fixed predictor lr)"
    learns = gain > 0.5 * d_gain and m["warning_step"] is None
    if not learns:
        return "not held", f"{facts}: it did not learn (gain {gain:+.1f} vs the default's {d_gain:+.1f})"
    if abs(diff) <= noise:
        return "partly", f"{facts}: learned; {diff:+.1f} points vs the default is within noise (±{noise:.1f})"
    return ("held" if diff < 0 else "partly"), f"{facts}: learned, {diff:+.1f} points vs the default"


def write_outputs(rows: list[dict], out: Path, dim: int | None, header: str) -> None:
    """``ablations.md`` / ``.json`` / ``.csv`` and ``ablations.png`` in ``out``."""
    cols = ("variant", "flags", "paper", "final loss", "z-std ×√dim", "collapse warning", "kNN init → final",
            "verdict")
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in rows:
        m = r["measured"]
        lines.append("| " + " | ".join([
            r["name"], f"`{' '.join(r['flags'])}`" if r["flags"] else "—", f"{r['expectation']} ({r['source']})",
            f"{m['final_loss']:+.3f}", f"{m['z_std_ratio']:.2f}",
            f"step {m['warning_step']}" if m["warning_step"] is not None else "none",
            f"{m['knn_init']:.1f}% → {m['knn_final']:.1f}%", f"**{r['status']}**: {r['why']}",
        ]) + " |")
    (out / "ablations.md").write_text("\n".join(lines) + "\n")
    slim = [{**{k: v for k, v in r.items() if k != "measured"},
             "measured": {k: v for k, v in r["measured"].items() if k != "curve"}} for r in rows]
    (out / "ablations.json").write_text(json.dumps({"header": header, "rows": slim}, indent=1))
    with open(out / "ablations.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "flags", "paper", "source", "final_loss", "z_std_ratio", "warning_step",
                    "knn_init", "knn_final", "minutes", "status", "why"])
        for r in rows:
            m = r["measured"]
            w.writerow([r["key"], " ".join(r["flags"]), r["expectation"], r["source"], f"{m['final_loss']:.4f}",
                        f"{m['z_std_ratio']:.4f}", m["warning_step"], m["knn_init"], m["knn_final"],
                        f"{m['minutes']:.2f}", r["status"], r["why"]])
    plot_study({r["name"]: {"history": r["measured"]["history"], "curve": r["measured"]["curve"],
                            "warning_step": r["measured"]["warning_step"], "similarity": r["measured"]["similarity"]}
                for r in rows}, out / "ablations.png", dim)


def main(argv=None) -> dict:
    """Run the chosen variants and write the study; returns ``{"out", "rows", "minutes"}``."""
    args = parse_args(argv)
    started = time.time()
    if not (Path(args.data) / "val").is_dir():
        raise FileNotFoundError(f"{args.data}/val does not exist: the study's kNN monitor scores the val split")
    out = Path(args.out) if args.out else Path("bench/results") / time.strftime("ablations-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    base = [*RECIPE, *PRESETS[args.preset], "--data", str(args.data), "--seed", str(args.seed), "--no-progress", *args.train_args]
    rows, default = [], None
    for v in args.variants:
        run_dir = out / "runs" / v.key
        argv_v = [*base, *v.flags, "--out", str(run_dir)]
        print(f"\n=== {v.name}: python train.py {' '.join(argv_v)}", flush=True)
        summary = train.main(argv_v)
        similarity = "cross-entropy" if "cross-entropy" in v.flags else "cosine"
        m = measure(summary, run_dir, similarity)
        if v.key == "default":
            default = m
        rows.append({"key": v.key, "name": v.name, "flags": list(v.flags), "expectation": v.expectation,
                     "source": v.source, "measured": m})
        plot_run(m["history"], m["curve"], run_dir / "curves.png", m["dim"], warning_step=m["warning_step"])
    val = scan_image_folder(Path(args.data) / "val")  # the queries of the kNN monitor (cached scan)
    chance = 100.0 / len(val.classes)
    knn_args = train.parse_args(base)
    queries = min(knn_args.knn_queries or len(val), len(val))
    noise = noise_points(default["knn_final"], queries) if default else 1.0
    for r in rows:
        r["status"], r["why"] = verdict(r["key"], r["measured"], default, chance, noise)
    minutes = (time.time() - started) / 60
    header = (f"SimSiam ablations, preset `{args.preset}` (`{' '.join(base)}`): {len(rows)} runs in {minutes:.1f} min; "
              f"kNN on {queries} val images, chance = {chance:.0f}%; kNN differences within ±{noise:.1f} points "
              f"(two standard errors) are called noise")
    write_outputs(rows, out, rows[0]["measured"]["dim"] if rows else None, header)
    print("\n" + (out / "ablations.md").read_text())
    print(f"table: {out}/ablations.md (.json, .csv)   plot: {out}/ablations.png   runs: {out}/runs/")
    return {"out": str(out), "rows": rows, "minutes": minutes}


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, NotADirectoryError, train.CheckpointError, ValueError, ImportError) as exc:
        sys.exit(f"error: {exc}")
