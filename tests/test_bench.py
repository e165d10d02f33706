"""The benchmark harness: arithmetic on a fake clock, a --quick run's files, OOM handling, trace summary."""
import csv
import json
import os

import pytest
import torch

import train
from pipeline import build_loader, recipe
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
        assert len(r["window_images_per_s"]) == r["repeats"]
        assert min(r["window_images_per_s"]) == pytest.approx(r["images_per_s_min"], abs=0.01)
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


def test_recipe_measures_the_training_recipes_head_batch_and_views(photo_folder, tmp_path, monkeypatch):
    """``--recipe fmnist`` benchmarks what ``train.py --recipe fmnist`` trains: its head, its batch and its
    augmentation reach the model and the loaders; an explicit flag still wins."""
    from bench import stages
    fmnist = train.RECIPES["fmnist"]
    cpu = torch.device("cpu")
    args = throughput.resolve(throughput.parse_args(["--recipe", "fmnist"]), cpu)
    assert (args.batch_sizes, args.dim, args.pred_dim, args.proj_layers, args.small_stem) == (
        [fmnist["batch_size"]], fmnist["dim"], fmnist["pred_dim"], fmnist["proj_layers"], fmnist["small_stem"])
    plain = throughput.resolve(throughput.parse_args([]), cpu)
    assert (plain.dim, plain.pred_dim, plain.proj_layers, plain.small_stem) == (2048, 512, 3, False)

    seen = {}  # what the real loaders and the real model were built with
    real_build, real_trainer = stages.build_loader, stages.Trainer.__init__

    def build_loader_(name, **kw):
        seen[name] = kw["aug"]
        return real_build(name, **kw)

    def trainer(self, s, ctx=None):
        real_trainer(self, s, ctx)
        seen["model"] = self.model
    monkeypatch.setattr(stages, "build_loader", build_loader_)
    monkeypatch.setattr(stages.Trainer, "__init__", trainer)
    out = tmp_path / "fmnist"
    throughput.main(["--recipe", "fmnist", "--image-size", "16", "--pred-dim", "64", "--batch-sizes", "8",
                     "--stages", "e2e", "--loaders", "torch", "--data", str(photo_folder), "--warmup", "0",
                     "--repeats", "1", "--min-images", "8", "--budget-s", "0", "--out", str(out)])
    cfg = json.loads((out / "throughput.json").read_text())["config"]
    assert cfg["recipe"] == "fmnist" and cfg["batch_sizes"] == [8] and cfg["pred_dim"] == 64
    linears = [m for m in seen["model"].projector.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == fmnist["proj_layers"] and linears[-1].out_features == fmnist["dim"]
    aug = seen["torch"]
    assert (aug.size, aug.crop_scale, aug.grayscale_p, aug.blur_p) == (16, (fmnist["min_crop_scale"], 1.0), 0.0, 0.0)
    assert (aug.brightness, aug.contrast, aug.saturation, aug.hue) == fmnist["jitter"]
    assert throughput.recipe_augmentation(None, 16) == recipe(16) != aug  # no --recipe: the harness's own


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
    # the row keeps the peak to 0.1 MiB, so a crossing by less than that shows as equal once rounded
    assert "ceiling" in oom["note"] and oom["peak_mem_mb"] >= round(ceiling, 1)
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


# ---------------------------------------------------------------------------- trustworthy points

def test_loader_specs_name_constructor_options():
    from bench.stages import parse_loader_spec
    assert parse_loader_spec("torch") == ("torch", {})
    assert parse_loader_spec("dali:cpu_decode=1:hw_decoder_load=0.9") == ("dali", {"cpu_decode": True, "hw_decoder_load": 0.9})
    assert parse_loader_spec("ffcv:os_cache=off:order=quasi_random") == ("ffcv", {"os_cache": False, "order": "quasi_random"})
    assert parse_loader_spec("dali:workers=1") == ("dali", {"workers": 1})
    for bad in ("dali:colour=1", "torch:threads=3", "torch:workers=two", "ffcv:os_cache=maybe", "dali:hw_decoder_load=x",
                "dali:cpu_decode"):
        with pytest.raises(ValueError, match="loader spec"):
            parse_loader_spec(bad)


def test_a_loader_specs_workers_override_the_runs(photo_folder, monkeypatch):
    """``workers=N`` in a spec builds that series with N workers / DALI threads; the others keep ``-j``."""
    import pipeline.backends.dali.loader as dali_loader
    from bench.stages import Settings, make_loader
    from bench.throughput import bench_images
    threads = []  # num_threads of every DALI pipeline built (the real one, only recorded on its way)
    real = dali_loader.simsiam_pipeline
    monkeypatch.setattr(dali_loader, "simsiam_pipeline", lambda *a, **kw: threads.append(kw["num_threads"]) or real(*a, **kw))
    s = Settings(device=torch.device("cpu"), image_size=16, workers=2, images=bench_images(str(photo_folder), 16, 0))
    assert make_loader("torch", 4, s).loader.num_workers == 2
    assert make_loader("torch:workers=0", 4, s).loader.num_workers == 0
    for spec in ("dali:workers=1", "dali"):
        batch = next(iter(make_loader(spec, 4, s)))
        assert batch.view1.shape == (4, 3, 16, 16)
    assert threads == [1, 2]


def test_dali_cpu_decode_on_the_cpu_says_it_does_nothing(photo_folder):
    from pipeline.augment import recipe
    with pytest.warns(UserWarning, match="does nothing without a GPU"):
        build_loader("dali", photo_folder, recipe(16), batch_size=4, device="cpu", cpu_decode=True)
    with pytest.raises(ValueError, match="hw_decoder_load"):
        build_loader("dali", photo_folder, recipe(16), batch_size=4, device="cpu", hw_decoder_load=1.5)


class ScriptedPoints:
    """Stands in for bench.stages.run_point: returns scripted images/s per (stage, batch), in call order."""

    def __init__(self, script):
        self.script = {k: list(v) for k, v in script.items()}
        self.calls = []

    def __call__(self, stage, name, batch, s, trainer, projection_s=None, profiler=None):
        self.calls.append((stage, batch))
        ips, spread, load = self.script[(stage, batch)].pop(0)
        return {"stage": stage, "loader": name, "batch": batch, "accum": 1, "effective_batch": batch, "status": "ok",
                "note": "", "images_per_s": ips, "images_per_s_min": ips * (1 - spread / 200),
                "images_per_s_max": ips * (1 + spread / 200), "spread_pct": spread, "views_per_s": 2 * ips,
                "step_s": batch / ips, "data_wait_share": 0.1, "peak_mem_mb": 100.0, "load_start": load, "load_end": load}


def test_impossible_and_noisy_points_are_remeasured_then_flagged(photo_folder, tmp_path, monkeypatch, capsys):
    script = ScriptedPoints({
        ("model", 8): [(100.0, 3, 0.5), (101.0, 2, 0.5)],          # re-measured because e2e beat it
        ("e2e", 8): [(150.0, 4, 0.5), (140.0, 4, 0.5)],            # still faster than model-only: flagged
        ("model", 16): [(100.0, 2, 0.5)],
        ("e2e", 16): [(70.0, 40, 0.5), (80.0, 5, 0.5)],            # spread 40% > 15%: re-measured, 5% kept
        ("model", 32): [(100.0, 30, 99.0), (100.0, 25, 99.0)],     # noisy twice, under a load above the cores
        ("e2e", 32): [(60.0, 3, 0.5)],
    })
    monkeypatch.setattr(throughput, "run_point", script)
    res = throughput.main(["--quick", "--loaders", "torch", "--stages", "model,e2e", "--batch-sizes", "8,16,32",
                           "--data", str(photo_folder), "--num-images", "22", "--out", str(tmp_path)])
    rows = {(r["stage"], r["batch"]): r for r in res["rows"]}
    assert script.calls.count(("model", 8)) == 2 and script.calls.count(("e2e", 8)) == 2
    assert "e2e>model" in rows[("e2e", 8)]["flags"] and "e2e>model" in rows[("model", 8)]["flags"]
    assert rows[("e2e", 8)]["stall_share"] is None
    e16 = rows[("e2e", 16)]
    assert e16["spread_pct"] == 5 and e16["attempts"] == [70.0, 80.0] and not e16.get("flags")
    assert e16["stall_share"] == pytest.approx(0.2)
    assert set(rows[("model", 32)]["flags"]) == {"spread", "load"}  # kept, marked, not hidden
    printed = capsys.readouterr().out
    assert printed.count("stage       loader") == 1  # the table is printed once, at the end
    assert "e2e>model: end to end beat model-only" in printed
    saved = json.loads((tmp_path / "throughput.json").read_text())
    assert "partial" not in saved and [r.get("flags", []) for r in saved["results"]] == [r.get("flags", []) for r in res["rows"]]
    table_line = next(line for line in printed.splitlines() if line.startswith("end-to-end") and " 8 " in line)
    assert " ? " in table_line  # no stall share for an impossible pair


def test_reference_model_rows_give_the_stall_share_of_an_e2e_only_run(photo_folder, tmp_path, monkeypatch):
    script = ScriptedPoints({("model", 8): [(100.0, 2, 0.5)], ("e2e", 8): [(75.0, 2, 0.5)]})
    monkeypatch.setattr(throughput, "run_point", script)
    throughput.main(["--quick", "--stages", "model", "--batch-sizes", "8", "--out", str(tmp_path / "m")])
    res = throughput.main(["--quick", "--loaders", "torch", "--stages", "e2e", "--batch-sizes", "8", "--data",
                           str(photo_folder), "--out", str(tmp_path / "e"), "--reference", str(tmp_path / "m" / "throughput.json")])
    assert res["rows"][0]["stall_share"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="other settings"):
        throughput.main(["--quick", "--image-size", "24", "--loaders", "torch", "--stages", "e2e", "--batch-sizes", "8",
                         "--data", str(photo_folder), "--out", str(tmp_path / "x"),
                         "--reference", str(tmp_path / "m" / "throughput.json")])


def test_section_time_limit_skips_the_rest(photo_folder, tmp_path, monkeypatch):
    import time as time_mod
    script = ScriptedPoints({("model", 8): [(100.0, 2, 0.5)]})

    def slow(*a, **k):
        time_mod.sleep(1.2)
        return script(*a, **k)
    monkeypatch.setattr(throughput, "run_point", slow)
    res = throughput.main(["--quick", "--stages", "model", "--batch-sizes", "8,16,32", "--time-limit-s", "1",
                           "--out", str(tmp_path)])
    assert [r["status"] for r in res["rows"]] == ["ok", "skipped", "skipped"]
    assert "section time limit" in res["rows"][1]["note"]


def test_ffcv_colour_stage_leaves_the_decoding_threads_their_cores():
    from pipeline.backends.ffcv.loader import colour_threads_for
    assert colour_threads_for(torch.device("cuda"), 2) is None  # on a GPU the stage is not on the CPU
    n = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    assert colour_threads_for(torch.device("cpu"), cores) == 1  # FFCV's threads take every core: one is left
    assert colour_threads_for(torch.device("cpu"), 1) == max(1, min(n, cores - 1))


def test_nproc_2_runs_under_torchrun_and_sums_images_per_s_over_ranks(photo_folder, tmp_path):
    res = throughput.main(["--quick", "--nproc", "2", "--stages", "loader,model", "--loaders", "torch",
                           "--batch-sizes", "4", "--num-images", "16", "--data", str(photo_folder),
                           "--out", str(tmp_path / "b")])
    assert res["config"]["world_size"] == 2
    rows = {r["stage"]: r for r in res["rows"]}
    assert rows["model"]["status"] == rows["loader"]["status"] == "ok"
    assert rows["model"]["ranks"] == rows["loader"]["ranks"] == 2  # each rank measured; images/s summed
    assert rows["loader"]["images_per_s"] > 0 and rows["model"]["images_per_s"] > 0
