"""The benchmark harness: arithmetic on a fake clock, a --quick run's files, OOM handling, trace summary."""
import csv
import json

import pytest
import torch

import train
from bench import throughput, trace_summary
from bench.memory import MemoryCeilingExceeded, is_oom, rss_mb
from bench.stages import TimedIter
from bench.timing import images_per_s, measure, stall_share, summarize, timed_window, views_per_s


class FakeClock:
    """A clock that only moves when a fake step says so."""

    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


# ---------------------------------------------------------------------------- arithmetic

def test_throughput_arithmetic():
    assert images_per_s(512, 2.0) == 256.0
    assert views_per_s(512, 2.0) == 512.0
    with pytest.raises(ValueError):
        images_per_s(10, 0.0)
    assert stall_share(75.0, 100.0) == pytest.approx(0.25)
    assert stall_share(100.0, 100.0) == 0.0
    assert stall_share(110.0, 100.0) == 0.0  # noise: never negative
    s = summarize([90.0, 100.0, 120.0])
    assert (s.median, s.min, s.max) == (100.0, 90.0, 120.0)
    assert s.spread_pct == pytest.approx(30.0)


def test_measure_excludes_warmup_and_counts_images_on_a_fake_clock():
    clock = FakeClock()
    durations = iter([10.0, 10.0] + [0.5] * 4 + [0.25] * 4 + [1.0] * 4)  # 2 slow warm-up steps, 3 windows

    def step():
        clock.t += next(durations)
        return 32

    seen = []
    windows = measure(step, warmup=2, steps=4, repeats=3, clock=clock, on_first=seen.append)
    assert seen == [10.0]
    assert [w.seconds for w in windows] == [2.0, 1.0, 4.0]  # the 20 s of warm-up are in no window
    assert [w.images for w in windows] == [128] * 3
    assert [w.images_per_s for w in windows] == [64.0, 128.0, 32.0]
    assert summarize([w.images_per_s for w in windows]).median == 64.0
    assert windows[0].step_s == 0.5


def test_data_wait_share_and_sync_on_a_fake_clock():
    clock = FakeClock()
    syncs = []

    def batches():
        while True:
            clock.t += 0.3  # waiting for the loader
            yield torch.zeros(8, 3, 2, 2)

    it = TimedIter(batches(), clock)

    def step():
        before = it.wait_s
        b = next(it)
        clock.t += 0.7  # compute
        return b.shape[0], it.wait_s - before

    w = timed_window(step, 5, clock, sync=lambda: syncs.append(clock.t))
    assert w.seconds == pytest.approx(5.0) and w.images == 40
    assert w.data_s / w.seconds == pytest.approx(0.3)
    assert len(syncs) == 2  # before the first and after the last reading


def test_is_oom():
    assert is_oom(MemoryCeilingExceeded("x"))
    assert is_oom(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory"))
    assert not is_oom(RuntimeError("shape mismatch"))


# ---------------------------------------------------------------------------- a real quick run

def test_quick_run_writes_table_json_csv_png(photo_folder, tmp_path, capsys):
    out = tmp_path / "quick"
    throughput.main(["--quick", "--loaders", "torch", "--data", str(photo_folder), "--out", str(out),
                           "--profile", "--profile-schedule", "0,1,1"])
    printed = capsys.readouterr().out
    assert "images/s" in printed and "end-to-end" in printed and "verdict:" in printed
    data = json.loads((out / "throughput.json").read_text())
    assert data["env"]["torch"] == torch.__version__ and data["env"]["cpu_count"] >= 1
    assert data["config"]["arch"] == "resnet18" and data["config"]["image_size"] == 16
    assert data["config"]["num_images"] == 22 and "partial" not in data  # real photos; final write
    rows = data["results"]
    assert {(r["stage"], r["batch"]) for r in rows} == {(s, b) for s in ("loader", "model", "e2e") for b in (8, 16)}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["images_per_s"] > 0 and r["views_per_s"] == pytest.approx(2 * r["images_per_s"])
        assert r["images_per_s_min"] <= r["images_per_s"] <= r["images_per_s_max"]
        assert r["peak_mem_mb"] > 50 and r["mem_kind"] == "process_rss"
        # images/s = images / time: the median step time lies between batch / max and batch / min images/s
        eb = r["effective_batch"]
        assert eb / r["images_per_s_max"] * 0.999 <= r["step_s"] <= eb / r["images_per_s_min"] * 1.001
    for r in (r for r in rows if r["stage"] == "e2e"):
        assert 0.0 <= r["stall_share"] <= 1.0 and 0.0 <= r["data_wait_share"] <= 1.0
    with open(out / "throughput.csv") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == len(rows) and float(lines[0]["images_per_s"]) > 0 and lines[0]["arch"] == "resnet18"
    for name in ("images_per_s.png", "step_time.png"):
        png = out / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        import matplotlib.pyplot as plt
        assert plt.imread(png).shape[0] > 100
    prof = data["profile"]
    assert prof["status"] == "ok" and prof["verdict"].startswith("verdict:")
    assert (out / "profile" / "trace.json").exists() and list((out / "profile" / "tb").glob("*.pt.trace.json"))


# ---------------------------------------------------------------------------- OOM: recorded, sweep goes on

def test_oom_point_is_recorded_and_the_sweep_continues(tmp_path):
    ceiling = rss_mb() + 600  # MiB: room for the tiny model and batch 4, not for batch 1024's activations at full
    # 16 px resolution (the small stem keeps the 16x16 maps that the standard stem would shrink to 4x4)
    out = tmp_path / "oom"
    res = throughput.main(["--quick", "--small-stem", "--stages", "model", "--batch-sizes", "4,1024,4", "--memory-ceiling",
                           str(ceiling), "--budget-s", "0", "--out", str(out)])
    status = [(r["batch"], r["status"]) for r in res["rows"]]
    assert status == [(4, "ok"), (1024, "oom"), (4, "ok")]
    oom = res["rows"][1]
    assert "ceiling" in oom["note"] and oom["peak_mem_mb"] > ceiling
    saved = json.loads((out / "throughput.json").read_text())["results"]
    assert [r["status"] for r in saved] == ["ok", "oom", "ok"]


# ---------------------------------------------------------------------------- traces

def test_trace_summary_arithmetic_on_a_handmade_trace(tmp_path):
    ev = [{"ph": "X", "cat": "user_annotation", "name": "ProfilerStep#1", "ts": 0, "dur": 1000, "pid": 1, "tid": 1},
          {"ph": "X", "cat": "user_annotation", "name": "data", "ts": 0, "dur": 400, "pid": 1, "tid": 1},
          {"ph": "X", "cat": "user_annotation", "name": "forward", "ts": 400, "dur": 300, "pid": 1, "tid": 1},
          {"ph": "X", "cat": "cpu_op", "name": "aten::conv2d", "ts": 410, "dur": 200, "pid": 1, "tid": 1},
          {"ph": "X", "cat": "cpu_op", "name": "aten::mkldnn_convolution", "ts": 420, "dur": 150, "pid": 1, "tid": 1},
          {"ph": "X", "cat": "user_annotation", "name": "backward", "ts": 700, "dur": 300, "pid": 1, "tid": 1}]
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": ev}))
    s = trace_summary.summarize_trace(path)
    assert s["shares"]["data"] == pytest.approx(0.4) and s["shares"]["backward"] == pytest.approx(0.3)
    ops = {o["name"]: o["self_ms"] for o in s["top_ops"]}
    assert ops == {"aten::mkldnn_convolution": pytest.approx(0.15), "aten::conv2d": pytest.approx(0.05)}
    assert "INPUT-BOUND" in s["verdict"] and "40.0%" in s["verdict"]
    assert "COMPUTE-BOUND" in trace_summary.verdict({"data": 0.05, "forward": 0.5})


def test_train_profile_trace_has_the_labelled_ranges(photo_folder, tmp_path, capsys):
    out = tmp_path / "run"  # 22 real photos, batch 4: 5 steps, 2 of them profiled
    train.main(["--data", str(photo_folder.parent), "--out", str(out), "--image-size", "16", "--dim", "128",
                "--pred-dim", "32", "-b", "4", "--epochs", "1", "--no-knn", "--no-progress",
                "-j", "1", "--profile", "--profile-schedule", "1,1,2"])
    assert "profiler trace:" in capsys.readouterr().out
    assert list((out / "profile" / "tb").glob("*.pt.trace.json"))
    s = trace_summary.main([str(out / "profile")])
    assert s["steps"] == 2
    for label in trace_summary.LABELS:
        assert s["range_ms"][label] > 0, label
    assert 0.5 < sum(s["shares"].values()) <= 1.0 + 1e-6
    names = [o["name"] for o in s["top_ops"]]
    assert any("conv" in n for n in names)
    assert s["verdict"].startswith("verdict: ") and ("INPUT-BOUND" in s["verdict"] or "COMPUTE-BOUND" in s["verdict"])
    assert "share of step time per labelled range" in capsys.readouterr().out


def test_gradient_accumulation_counts_images_and_updates_once():
    from bench.stages import Settings, Trainer
    s = Settings(device=torch.device("cpu"), image_size=8, dim=64, pred_dim=16)
    t = Trainer(s)
    before = t.model.backbone.conv1.weight.detach().clone()
    views = [torch.randn(4, 3, 8, 8) for _ in range(6)]
    batches = iter([type("B", (), {"view1": views[i], "view2": views[i + 3]})() for i in range(3)])
    assert t.step(batches, accum=3) == 12  # three batches of 4 images, one optimiser step
    assert next(batches, None) is None
    assert not torch.equal(before, t.model.backbone.conv1.weight)
    assert all(t.optimizer.state[p]["momentum_buffer"] is not None for p in t.optimizer.param_groups[0]["params"][:3])


def test_trace_summary_refuses_a_trace_without_steps(tmp_path):
    for text in ('{"traceEvents": []}', "[1, 2, 3]"):
        (tmp_path / "t.json").write_text(text)
        with pytest.raises(ValueError, match="no profiled step"):
            trace_summary.summarize_trace(tmp_path / "t.json")
