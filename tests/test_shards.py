"""Tar shards: the writer, the epoch plan, the torch loader over shards, bad samples, resume,
``pipe:`` URLs, and training / evaluation from shards under torchrun (one node and two).

Shards are written in the tests from real images: a Fashion-MNIST slice, foolbox's photos.
"""
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import build_loader, recipe
from pipeline.backends.torch import BadShardData, view_transform
from pipeline.sampling import epoch_seed
from pipeline.shards.write import ORIGINAL_KINDS, _write_shard, dali_index_lines, plan_shards, write_shards
from pipeline.sources import open_splits
from pipeline.sources.imagefolder import decode_rgb, load_rgb, scan_image_folder
from pipeline.sources.shards import INDEX_KIND, ShardPlanError, ShardSource, open_shards, read_index

ROOT = Path(__file__).resolve().parents[1]
UNEQUAL = [13, 13, 13, 13, 5, 3]  # 60 samples, the unequal shards


def write_unequal(images, out: Path, sizes, split="train", seed=0) -> Path:
    """Shards of the given sizes (the writer's shuffle and shard writer) and their index."""
    flat = [s for shard in plan_shards(images, seed, "samples", len(images)) for s in shard]
    out.mkdir(parents=True, exist_ok=True)
    entries, at = [], 0
    for k, n in enumerate(sizes):
        name = f"{split}-{k:06d}.tar"
        size, _ = _write_shard(out / name, flat[at:at + n])
        entries.append({"url": name, "nsamples": n, "filesize": size})
        at += n
    index = out / f"{split}.json"
    index.write_text(json.dumps({"__kind__": INDEX_KIND, "wids_version": 1, "name": split, "shardlist": entries,
                                 "classes": images.classes, "seed": seed}))
    return index


def rewrite(tar: Path, change) -> None:
    """Rewrite a real tar through ``change(members)`` and index it again as DALI's wds2idx would."""
    with tarfile.open(tar) as t:
        members = [(m, t.extractfile(m).read()) for m in t]
    with tarfile.open(tar, "w") as t:
        for m, data in change(members):
            m.size = len(data)
            t.addfile(m, io.BytesIO(data))
    tar.with_suffix(".idx").write_text("\n".join(dali_index_lines(tar)) + "\n")


@pytest.fixture(scope="module")
def small(fmnist_root, tmp_path_factory):
    """60 train + 60 val Fashion-MNIST images (6 per class) as an ImageFolder."""
    from conftest import copy_slice
    return copy_slice(fmnist_root, tmp_path_factory.mktemp("shard_src"), per_class=6)


@pytest.fixture(scope="module")
def unequal(small, tmp_path_factory):
    """The train split as 13/13/13/13/5/3-sample shards; val as 6 shards of 10."""
    out = tmp_path_factory.mktemp("unequal")
    write_unequal(scan_image_folder(small / "val"), out, [10] * 6, split="val")
    return write_unequal(scan_image_folder(small / "train"), out, UNEQUAL)


def keys_of(loader, epoch, start=0):
    loader.set_epoch(epoch, start)
    batches = list(loader)
    assert len(batches) == len(loader) - start
    return loader.keys, batches


# ---------------------------------------------------------------------- the writer

def test_writer_keeps_jpeg_bytes_reencodes_the_rest_and_lists_bad_files(photo_dir, tmp_path):
    src = tmp_path / "src"
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (src / split / cls).mkdir(parents=True)
    jpegs = sorted(photo_dir.glob("imagenet_*.jpg"))[:8]
    for i, f in enumerate(jpegs):
        shutil.copy(f, src / "train" / ("a" if i % 2 else "b") / f.name)
    png = sorted(photo_dir.glob("cifar10_*.png"))[0]
    shutil.copy(png, src / "train" / "a" / "c.png")
    Image.open(jpegs[0]).convert("P").save(src / "train" / "b" / "gif_named.jpg", format="GIF")
    (src / "train" / "a" / "broken.jpg").write_bytes(jpegs[1].read_bytes()[:300])
    shutil.copy(jpegs[2], src / "val" / "a" / "v.jpg")
    shutil.copy(jpegs[3], src / "val" / "b" / "w.jpg")

    reports = write_shards(src, tmp_path / "out", shard_size="4", seed=1, progress=False)
    train = reports[0]
    assert (train.samples, train.shards, train.original, train.reencoded) == (10, 3, 8, 2)
    spec = json.loads((tmp_path / "out" / "train.json").read_text())
    assert spec["__kind__"] == INDEX_KIND and spec["classes"] == ["a", "b"] and spec["seed"] == 1
    assert [e["nsamples"] for e in spec["shardlist"]] == [4, 4, 2]
    assert [Path(p).name for p, _ in spec["skipped"]] == ["broken.jpg"]
    assert not [p for p in (tmp_path / "out").iterdir() if ".tmp" in p.name]  # atomic: no leftovers

    keys = {k: f for k, _, f in (line.split("\t") for line in (tmp_path / "out" / "train-keys.tsv").read_text().splitlines())}
    images = scan_image_folder(src / "train")
    label_of = dict(images.samples)
    for entry in spec["shardlist"]:
        tar = tmp_path / "out" / entry["url"]
        idx = (tar.with_suffix(".idx")).read_text().splitlines()
        assert idx == dali_index_lines(tar) and idx[0] == f"v1.2 {entry['nsamples']}"
        with tarfile.open(tar) as t:
            members = {m.name: t.extractfile(m).read() for m in t}
        for name, data in members.items():
            key, ext = name.split(".", 1)
            file = keys[key]
            if ext == "cls":
                assert int(data) == label_of[file]
            elif ext == "jpg":  # original bytes
                assert data == Path(file).read_bytes()
            else:  # a lossless PNG of PIL's upright RGB pixels: the PNG and the GIF named .jpg
                assert ext == "png" and Path(file).name in ("c.png", "gif_named.jpg")
                assert np.array_equal(np.asarray(decode_rgb(data)), np.asarray(load_rgb(file)))


def test_writer_shuffles_so_no_shard_is_one_class(small, tmp_path):
    (report, _) = write_shards(small, tmp_path, shard_size="10", progress=False)
    source = read_index(report.index)
    for url, _ in source.shards:
        with tarfile.open(url) as t:
            labels = {int(t.extractfile(m).read()) for m in t if m.name.endswith(".cls")}
        assert len(labels) > 2
    with pytest.raises(ValueError, match="already written"):
        write_shards(small, tmp_path, shard_size="10", progress=False)


def test_dali_reads_the_writers_shards_through_its_indexes(unequal):
    dali = pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def

    source = read_index(unequal)
    urls = [u for u, _ in source.shards]

    @pipeline_def(batch_size=4, num_threads=1, device_id=None)
    def pipe():
        jpg, cls = fn.readers.webdataset(paths=urls, index_paths=[str(Path(u).with_suffix(".idx")) for u in urls],
                                         ext=["jpg", "cls"], missing_component_behavior="error", name="R")
        return fn.decoders.image(jpg, device="cpu"), cls

    p = pipe()
    p.build()
    assert p.reader_meta("R")["epoch_size"] == sum(UNEQUAL)
    images, cls = p.run()
    assert images.at(0).shape[2] == 3 and int(bytes(cls.at(0)).decode()) in range(10)
    del dali


# ---------------------------------------------------------------------- the plan

@pytest.mark.parametrize("world,readers", [(1, 1), (2, 2), (3, 2), (2, 3)])
def test_plan_splits_every_epoch_exactly_and_resumes_in_order(unequal, world, readers):
    source = read_index(unequal)
    b = 4
    total = source.batches_per_rank(b, world)
    everything = []
    for rank in range(world):
        plans = source.plan(7, 2, rank, world, readers, b)
        assert sum(p.batches for p in plans) == total
        taken = [(p.shard, p.skip + i) for plan in plans for p in plan.pieces for i in range(p.take)]
        assert len(taken) == total * b
        everything += taken
        for start in range(total + 1):  # a resumed epoch: the rest of the round-robin, in order
            resumed = source.plan(7, 2, rank, world, readers, b, start)
            positions = []
            for k in range(max(p.batches for p in resumed)):
                positions += [(p.reader, p.skip_batches + k) for p in resumed if k < p.batches]
            assert [r + readers * k for r, k in positions] == list(range(start, total))
    assert len(set(everything)) == len(everything) == world * total * b  # disjoint over ranks
    assert source.shard_order(7, 2) != source.shard_order(7, 3)  # a new order every epoch


def test_too_few_shards_are_refused_with_how_many_are_needed(unequal):
    with pytest.raises(ShardPlanError, match="cannot feed 2 rank.* x 4 reader.*= 8: write at least 8 shards"):
        build_loader("torch", read_index(unequal), recipe(8), batch_size=2, workers=4, rank=0, world_size=2)


# ---------------------------------------------------------------------- the torch loader

@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("workers", [0, 2])
def test_every_rank_yields_the_planned_batches_disjoint_and_covering(unequal, tmp_path, world, workers):
    out = tmp_path / "keys"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           "tests/dist/shard_epoch.py", str(unequal), str(workers), "4", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    planned = sum(UNEQUAL) // (4 * world)
    assert [r["batches"] for r in ranks] == [planned] * world and [r["len"] for r in ranks] == [planned] * world
    keys = [k for r in ranks for k in r["keys"]]
    assert len(keys) == len(set(keys)) == world * planned * 4  # disjoint; the rest is < one global batch


def test_two_views_come_from_one_key_and_differ(unequal):
    aug = recipe(16)
    loader = build_loader("torch", read_index(unequal), aug, batch_size=5, workers=0, seed=3, record_keys=True)
    keys, batches = keys_of(loader, 4)
    source = read_index(unequal)
    shard_of = {u: i for i, (u, _) in enumerate(source.shards)}
    t = view_transform(aug)
    checked = 0
    for b, batch in enumerate(batches):
        for i in range(2):
            url, key = keys[b * 5 + i].split("#")
            with tarfile.open(url) as tar:
                names = [m.name for m in tar if m.name.endswith(".jpg")]
                position = names.index(f"{key}.jpg")
                data = tar.extractfile(f"{key}.jpg").read()
            image = decode_rgb(data)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(epoch_seed(3, 4, shard_of[url], position, 0))
                v1, v2 = t(image), t(image)
            assert torch.equal(batch.view1[i], v1) and torch.equal(batch.view2[i], v2)
            assert not torch.equal(v1, v2)
            checked += 1
    assert checked == 2 * len(batches)


def test_resume_mid_epoch_reads_the_uninterrupted_epochs_samples(unequal):
    source = read_index(unequal)
    full = build_loader("torch", source, recipe(8), batch_size=4, workers=2, seed=5, record_keys=True)
    keys, batches = keys_of(full, 1)
    for start in (1, 4, 5):
        resumed = build_loader("torch", source, recipe(8), batch_size=4, workers=2, seed=5, record_keys=True)
        rkeys, rbatches = keys_of(resumed, 1, start)
        assert rkeys == keys[start * 4:]
        assert all(torch.equal(a.view1, b.view1) for a, b in zip(rbatches, batches[start:]))
    other, _ = keys_of(full, 2)
    assert other != keys  # another epoch, another order


def test_nothing_decodes_an_image_while_shards_are_opened_and_loaders_built(unequal, monkeypatch):
    opened = []
    real = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a) or real(*a, **k))
    train, val = open_splits(unequal.parent)
    build_loader("torch", train, recipe(8), batch_size=4, workers=2)
    assert opened == [] and (train.num_samples, val.num_samples) == (60, 60)


def test_a_pipe_url_trains_like_a_local_path(unequal):
    local = read_index(unequal)
    piped = read_index(unequal, url_template=f"pipe:cat {unequal.parent}/{{}}")
    assert piped.shards[0][0].startswith("pipe:cat ")
    a, ba = keys_of(build_loader("torch", local, recipe(8), batch_size=4, workers=2, record_keys=True), 0)
    b, bb = keys_of(build_loader("torch", piped, recipe(8), batch_size=4, workers=2, record_keys=True), 0)
    assert [k.split("#")[1] for k in a] == [k.split("#")[1] for k in b]
    assert all(torch.equal(x.view1, y.view1) for x, y in zip(ba, bb))
    # a brace pattern through pipe: (counted epochs: the total is given)
    pattern = f"pipe:cat {unequal.parent}/train-{{000000..000005}}.tar"
    counted = open_shards(pattern, num_samples=60)
    keys, _ = keys_of(build_loader("torch", counted, recipe(8), batch_size=4, workers=2, record_keys=True), 0)
    assert len(keys) == 60 // 4 * 4 and len(set(keys)) > 40


# ---------------------------------------------------------------------- bad samples

@pytest.fixture()
def damaged(small, tmp_path):
    """6 shards of 10: a corrupt JPEG in shard 0, a sample without .cls in shard 1, shard 2 cut short."""
    index = write_unequal(scan_image_folder(small / "train"), tmp_path, [10] * 6)
    shards = [tmp_path / f"train-{k:06d}.tar" for k in range(6)]

    rewrite(shards[0], lambda ms: [(m, d[:40] + b"\0" * 400 if i == 1 else d) for i, (m, d) in enumerate(ms)])
    rewrite(shards[1], lambda ms: [(m, d) for i, (m, d) in enumerate(ms) if i != 2])
    data = shards[2].read_bytes()
    shards[2].write_bytes(data[:len(data) // 2])
    return index


def test_bad_samples_are_skipped_counted_and_named(damaged, tmp_path):
    log = tmp_path / "skipped.txt"
    loader = build_loader("torch", read_index(damaged), recipe(8), batch_size=4, workers=2, max_bad_fraction=1.0,
                          skip_log=log, record_keys=True)
    keys, batches = keys_of(loader, 0)
    assert len(batches) == 15 and len(keys) == 60
    lines = [ln.split("\t") for ln in log.read_text().splitlines()]
    reasons = " ".join(r for _, _, r in lines)
    assert "cannot decode" in reasons and "no .cls" in reasons and "shard cut short" in reasons
    assert {Path(u).name for u, _, _ in lines} == {"train-000000.tar", "train-000001.tar", "train-000002.tar"}
    assert loader.bad >= 2 + 4  # the corrupt sample, the missing .cls, at least 4 of the cut shard's
    assert len(set(keys)) < len(keys)  # the readers that ran short repeated their own samples


def test_too_many_bad_samples_stop_with_one_line(damaged):
    loader = build_loader("torch", read_index(damaged), recipe(8), batch_size=4, workers=2, max_bad_fraction=0.01)
    with pytest.raises(BadShardData) as err:
        keys_of(loader, 0)
    assert "\n" not in str(err.value) and "--max-bad-fraction" in str(err.value)


def test_train_stops_with_one_line_on_bad_shards_and_too_few_shards(damaged, unequal, tmp_path):
    base = [sys.executable, "train.py", "--image-size", "8", "--dim", "32", "--pred-dim", "8", "-b", "8",
            "--epochs", "1", "--no-knn"]
    res = subprocess.run([*base, "--data", str(damaged), "-j", "2", "--out", str(tmp_path / "a")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and res.stderr.strip().count("\n") == 0, res.stderr[-2000:]
    assert "bad sample" in res.stderr and (tmp_path / "a" / "skipped.txt").read_text()
    res = subprocess.run([*base, "--data", str(unequal), "-j", "7", "--out", str(tmp_path / "b")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "write at least 7 shards" in res.stderr and "Traceback" not in res.stderr


# ---------------------------------------------------------------------- training and evaluation

TINY = ["--image-size", "8", "--small-stem", "--dim", "64", "--pred-dim", "16", "-b", "20", "-j", "2",
        "--knn-bank", "60", "--knn-k", "20", "--log-every", "2", "--epochs", "1"]


def test_train_from_shards_under_torchrun_then_evaluate_from_them(fmnist_slice, tmp_path):
    shards = tmp_path / "shards"
    write_shards(fmnist_slice, shards, shard_size="25", progress=False)  # 300 + 300 images, 12 shards each
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "train.py",
           "--data", str(shards), "--out", str(out), "--image-size", "8", "--small-stem", "--dim", "128",
           "--pred-dim", "32", "-b", "50", "-j", "2", "--epochs", "3", "--log-every", "3"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    history = json.loads((out / "history.json").read_text())
    assert history[-1]["knn_top1"] > history[0]["knn_top1"] + 3  # beats random init; the monitor reads val.json
    for script in ("knn_eval.py", "linear_eval.py"):
        extra = ["--cache-features", "--epochs", "2", "-b", "50", "--out", str(tmp_path / "lin")] if script == "linear_eval.py" else []
        res = subprocess.run([sys.executable, script, str(out / "checkpoint.pth"), "--data", str(shards / "train.json"), *extra],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        assert "top-1" in res.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_read_disjoint_samples_and_write_one_checkpoint(unequal, tmp_path):
    port = free_port()
    keys, out = tmp_path / "keys", tmp_path / "run"
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=shards", "train.py", "--data", str(unequal.parent),
               "--out", str(out), "--record-keys", str(keys), *TINY, "--no-knn"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path / f"cache{node}")}
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-2000:] for r in results]
    a, b = ((keys / f"epoch1-rank{r}.txt").read_text().split() for r in range(2))
    assert len(a) == len(b) == 60 // 20 * 10 and not set(a) & set(b)
    assert sorted(p.name for p in out.glob("checkpoint*.pth")) == ["checkpoint.pth"]


def test_a_benchmark_loader_spec_reads_shards_beside_the_imagefolder(unequal, small):
    from bench.stages import Settings, make_loader, parse_loader_spec
    from bench.throughput import bench_images

    assert parse_loader_spec(f"torch:data={unequal.parent}") == ("torch", {"data": str(unequal.parent)})
    s = Settings(device=torch.device("cpu"), image_size=8, workers=2)
    s.images = bench_images(str(small), 40, 0)
    s.sources[str(unequal.parent)] = bench_images(str(unequal.parent), 40, 0)
    files, shards = make_loader("torch", 4, s), make_loader(f"torch:data={unequal.parent}", 4, s)
    assert type(files).__name__ == "TorchLoader" and type(shards).__name__ == "TorchShardLoader"
    assert len(files) == len(shards) == 10
