"""Tar shards through the GPU loaders, on the CPU: ``--loader dali`` (DALI's ``fn.readers.webdataset``,
``device_id=None``) and ``--loader torchvision-gpu`` (``decode_jpeg`` on the CPU); resampled streams
on every shard backend; ``train.py`` from shards under torchrun with both loaders.

Shards are written here from a Fashion-MNIST slice with the writer's shard writer and DALI indexes
(the unequal 13/13/13/13/5/3 shards of ``tests/test_shards.py``); faults are made for real: a
corrupt JPEG, a sample without ``.cls``, inside real tars whose indexes are written again.
"""
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from pipeline import backend_class, build_loader, recipe
from pipeline.backends.torch import BadShardData
from pipeline.sources.imagefolder import scan_image_folder
from pipeline.sources.shards import ShardSource, read_index
from tests.host_reads import count_host_reads
from tests.test_shards import UNEQUAL, rewrite, small, unequal, write_unequal  # noqa: F401 (fixtures: 60 + 60 images; 13/13/13/13/5/3 shards)

ROOT = Path(__file__).resolve().parents[1]
B = 4


def tar_labels(keys: list[str]) -> list[int]:
    """The ``.cls`` stored in the tars for ``"<tar>#<key>"`` keys."""
    found = {}
    for tar in {k.split("#")[0] for k in keys}:
        with tarfile.open(tar) as t:
            for m in t:
                if m.name.endswith(".cls"):
                    found[f"{tar}#{m.name.split('.')[0]}"] = int(t.extractfile(m).read())
    return [found[k] for k in keys]


def epoch(loader, e, start=0):
    loader.set_epoch(e, start)
    batches = list(loader)
    assert len(batches) == len(loader) - start
    return list(loader.keys), batches


@pytest.fixture()
def damaged(small, tmp_path):
    """6 shards of 10 with DALI indexes: shard 0's second sample a corrupt JPEG (its first 40 bytes,
    then zeros); shard 1's third sample without its .cls; shard 2 cut in half (no index change)."""
    index = write_unequal(scan_image_folder(small / "train"), tmp_path, [10] * 6)
    shards = [tmp_path / f"train-{k:06d}.tar" for k in range(6)]
    rewrite(shards[0], lambda ms: [(m, d[:40] + b"\0" * 400 if m.name.endswith(".jpg") and i == 3 else d)
                                   for i, (m, d) in enumerate(ms)])
    rewrite(shards[1], lambda ms: [(m, d) for m, d in ms if not (m.name.endswith(".cls") and m.name.startswith(key(ms, 2)))])
    data = shards[2].read_bytes()
    shards[2].write_bytes(data[:len(data) // 2])
    return index


def key(members, n: int) -> str:
    """The key of the ``n``-th sample of a tar's members."""
    return sorted({m.name.split(".")[0] for m, _ in members})[n]


def corrupt_key(index: Path) -> str:
    """The key of the damaged fixture's corrupt JPEG (shard 0, its second sample)."""
    with tarfile.open(index.parent / "train-000000.tar") as t:
        return sorted({m.name.split(".")[0] for m in t})[1]


# ---------------------------------------------------------------------- --loader dali

@pytest.mark.parametrize("overlap", [None, False])  # None: DALI's pipelined executor; False: serial
def test_dali_two_ranks_read_the_torch_split_disjoint_in_equal_batches(unequal, overlap):
    dali = pytest.importorskip("nvidia.dali")
    source = read_index(unequal)
    per_rank = sum(UNEQUAL) // (B * 2)
    seen = []
    for rank in range(2):
        loader = build_loader("dali", source, recipe(8), batch_size=B, workers=1, rank=rank, world_size=2, seed=3,
                              record_keys=True, overlap=overlap)
        assert type(loader).__name__ == "DaliShardLoader" and len(loader) == per_rank
        assert loader.overlap is (overlap is None)
        keys, batches = epoch(loader, 1)
        assert all(b.view1.shape == (B, 3, 8, 8) and b.view2.shape == (B, 3, 8, 8) for b in batches)
        assert [int(x) for b in batches for x in b.label] == tar_labels(keys)  # DALI's .cls, in our order
        torch_keys, _ = epoch(build_loader("torch", source, recipe(8), batch_size=B, workers=0, rank=rank,
                                           world_size=2, seed=3, record_keys=True), 1)
        assert sorted(keys) == sorted(torch_keys)  # the same samples on the same rank as the torch loader
        resumed, _ = epoch(loader, 1, 3)
        assert resumed == keys[3 * B:]  # mid-epoch resume: the same samples from the step on
        other, _ = epoch(loader, 2)
        assert other != keys  # a new order every epoch
        seen += keys
    assert len(seen) == len(set(seen)) == 2 * per_rank * B  # disjoint over the ranks
    del dali


def test_dali_missing_cls_stops_with_one_line(damaged):
    """Found in the index before the epoch's first batch, named by shard and key."""
    pytest.importorskip("nvidia.dali")
    from pipeline.backends.dali.loader import DaliDecodeError
    source = read_index(damaged)
    with tarfile.open(damaged.parent / "train-000001.tar") as t:
        names = [m.name for m in t]
    missing = next(n.split(".")[0] for n in names if n.endswith(".jpg") and n.replace(".jpg", ".cls") not in names)
    ones = ShardSource(shards=[(source.shards[1][0], 9), source.shards[3]], num_samples=19, origin="two shards")
    loader = build_loader("dali", ones, recipe(8), batch_size=B, workers=1)
    with pytest.raises(DaliDecodeError) as err:
        next(iter(loader))
    text = str(err.value)
    assert "\n" not in text and f"train-000001.tar key {missing} has no .cls component" in text, text


def test_dali_own_missing_component_check_is_named_too(damaged, monkeypatch):
    """DALI's missing_component_behavior='error' (the backstop behind our index check) stops the
    build with a C++ context; the loader turns it into one line naming the shard and key."""
    pytest.importorskip("nvidia.dali")
    from pipeline.backends.dali import shards as dali_shards
    from pipeline.backends.dali.loader import DaliDecodeError

    def unchecked(tar):  # the index as it is, without our check of the components
        lines = dali_shards.index_of(tar).read_text().splitlines()[1:]
        return [dali_shards.IndexedSample(tar, ln.split()[3].split(".")[0], ln) for ln in lines]

    monkeypatch.setattr(dali_shards, "read_dali_index", unchecked)
    source = read_index(damaged)
    ones = ShardSource(shards=[(source.shards[1][0], 9), source.shards[3]], num_samples=19, origin="two shards")
    loader = build_loader("dali", ones, recipe(8), batch_size=B, workers=1)
    samples = loader.epoch_samples(0)
    with pytest.raises(DaliDecodeError) as err:
        list(loader)
    text = str(err.value)
    assert "\n" not in text and "C++" not in text and "train-000001.tar key" in text, text
    named = text.split(" key ")[1].split(":")[0]
    assert named in {s.key for s in samples if s.tar.endswith("train-000001.tar")}
    assert "cls" not in next(s.line for s in samples if s.key == named).split()[0::4]  # it is the one without .cls


def test_dali_corrupt_jpeg_stops_with_one_line_naming_shard_and_key(damaged, tmp_path):
    pytest.importorskip("nvidia.dali")
    from pipeline.backends.dali.loader import DaliDecodeError
    source = read_index(damaged)
    bad = corrupt_key(damaged)
    only = ShardSource(shards=[source.shards[0], source.shards[3]], num_samples=20, origin="two shards")
    log = tmp_path / "skipped.txt"
    loader = build_loader("dali", only, recipe(8), batch_size=B, workers=1, skip_log=log)
    with pytest.raises(DaliDecodeError) as err:
        list(loader)
    text = str(err.value)
    assert "\n" not in text and "train-000000.tar" in text and f"key {bad}" in text and "C++" not in text, text
    assert log.read_text().split("\t")[:2] == [str(damaged.parent / "train-000000.tar"), bad]


def test_dali_refuses_remote_shards_and_missing_indexes(unequal, tmp_path):
    pytest.importorskip("nvidia.dali")
    piped = read_index(unequal, url_template=f"pipe:cat {unequal.parent}/{{}}")
    with pytest.raises(ValueError, match="--loader dali reads tar files on a local or mounted filesystem"):
        build_loader("dali", piped, recipe(8), batch_size=B)
    for f in unequal.parent.glob("train-*"):
        if f.suffix == ".tar":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "train.json").write_text(unequal.read_text())
    with pytest.raises(ValueError, match="needs DALI's index beside each shard; 6 of 6"):
        build_loader("dali", read_index(tmp_path / "train.json"), recipe(8), batch_size=B)


# ---------------------------------------------------------------------- --loader torchvision-gpu

def test_tv_gpu_shards_give_the_torch_loaders_batches_channels_last(unequal):
    source = read_index(unequal)
    common = dict(batch_size=B, workers=2, seed=5, record_keys=True, shuffle_buffer=8)
    tv = build_loader("torchvision-gpu", source, recipe(8), channels_last=True, **common)
    assert type(tv).__name__ == "TorchvisionGpuShardLoader"
    keys, batches = epoch(tv, 2)
    torch_keys, torch_batches = epoch(build_loader("torch", source, recipe(8), **common), 2)
    assert keys == torch_keys and len(keys) == len(tv) * B  # same samples, same batches, same order
    assert all(torch.equal(a.label, b.label) for a, b in zip(batches, torch_batches))
    for b in batches:
        assert b.view1.shape == b.view2.shape == (B, 3, 8, 8) and b.view1.dtype == torch.float32
        assert b.view1.is_contiguous(memory_format=torch.channels_last)
        assert not torch.equal(b.view1, b.view2)
    resumed, rb = epoch(tv, 2, 5)
    assert resumed == keys[5 * B:] and all(torch.equal(a.view1, b.view1) for a, b in zip(rb, batches[5:]))
    it = iter(tv)  # the steady state reads nothing back from the device (the colour stage as on CUDA)
    tv.colour.selection = "masks"
    next(it)
    with count_host_reads() as counts:
        for _ in range(3):
            next(it)
    it.close()
    assert sum(counts.values()) == 0, dict(counts)


def test_tv_gpu_shards_skip_and_count_bad_samples_as_the_torch_loader(damaged, tmp_path):
    source = read_index(damaged)
    runs = {}
    for name in ("torch", "torchvision-gpu"):
        log = tmp_path / f"{name}.txt"
        loader = build_loader(name, source, recipe(8), batch_size=B, workers=2, max_bad_fraction=1.0, skip_log=log,
                              record_keys=True)
        keys, batches = epoch(loader, 0)
        lines = sorted((Path(u).name, k) for u, k, _ in (ln.split("\t") for ln in log.read_text().splitlines()))
        runs[name] = (loader.bad, lines, keys)
    assert runs["torch"] == runs["torchvision-gpu"]
    bad, lines, keys = runs["torchvision-gpu"]
    assert ("train-000000.tar", corrupt_key(damaged)) in lines and bad >= 2 + 4 and len(keys) == 60
    with pytest.raises(BadShardData) as err:
        epoch(build_loader("torchvision-gpu", source, recipe(8), batch_size=B, workers=2, max_bad_fraction=0.01), 0)
    assert "\n" not in str(err.value) and "--max-bad-fraction" in str(err.value)


# ---------------------------------------------------------------------- resampled streams

def test_resampled_draws_replay_for_a_seed_and_differ_across_ranks_and_readers(unequal):
    source = read_index(unequal).resample(40)
    draws = {}
    for rank in range(2):
        for p in source.plan(7, 3, rank, 2, 2, B):
            assert p.pieces == () and p.draw_seed is not None
            drawn = source.drawn(p.draw_seed)
            draws[rank, p.reader] = [next(drawn).shard for _ in range(30)]
    again = source.plan(7, 3, 0, 2, 2, B)[0]
    replay = source.drawn(again.draw_seed)
    assert [next(replay).shard for _ in range(30)] == draws[0, 0]
    assert len({tuple(d) for d in draws.values()}) == 4  # every (rank, reader) its own stream
    assert source.batches_per_rank(B, 2) == 40 // (B * 2)
    # an epoch of S draws from S shards with replacement leaves about 1/e of them unseen
    many = ShardSource(shards=[(f"s{i}.tar", 10) for i in range(2000)], num_samples=20000).resample()
    stream = many.drawn(1)
    unseen = 1 - len({next(stream).shard for _ in range(2000)}) / 2000
    assert abs(unseen - np.exp(-1)) < 0.03, unseen


@pytest.mark.parametrize("name", ["torch", "torchvision-gpu", "dali"])
def test_resampled_stream_replays_resumes_and_differs_across_ranks(unequal, name):
    if name == "dali":
        pytest.importorskip("nvidia.dali")
    source = read_index(unequal).resample(48)

    def make(rank):
        return build_loader(name, source, recipe(8), batch_size=B, workers=2, seed=9, rank=rank, world_size=2,
                            record_keys=True)

    first = make(0)
    assert len(first) == 48 // (B * 2)
    keys, _ = epoch(first, 1)
    assert epoch(make(0), 1)[0] == keys  # the same stream again for the same seed
    assert epoch(make(0), 1, 2)[0] == keys[2 * B:]  # resume: the stream from the step on
    assert epoch(make(1), 1)[0] != keys  # another rank draws its own shards
    assert epoch(first, 2)[0] != keys  # another epoch, other draws


def test_resampled_option_needs_shards_and_epoch_samples_needs_it(small, tmp_path):
    with pytest.raises(SystemExit):
        train.parse_args(["--epoch-samples", "40"])
    with pytest.raises(ValueError, match="--shards-resampled draws tar shards"):
        train.main(["--data", str(small), "--shards-resampled", "--out", str(tmp_path), "--epochs", "1"])


# ---------------------------------------------------------------------- the benchmark, train.py

def test_benchmark_specs_read_shards_with_the_gpu_loaders(unequal, small):
    from bench.stages import Settings, make_loader, parse_loader_spec
    from bench.throughput import bench_images
    s = Settings(device=torch.device("cpu"), image_size=8, workers=1)
    s.images = bench_images(str(small), 40, 0)
    s.sources[str(unequal.parent)] = bench_images(str(unequal.parent), 40, 0)
    assert type(make_loader(f"torchvision-gpu:data={unequal.parent}", 4, s)).__name__ == "TorchvisionGpuShardLoader"
    if backend_class("torch") is not None and importlib.util.find_spec("nvidia.dali") is not None:
        assert parse_loader_spec(f"dali:data={unequal.parent}:dont_use_mmap=1")[1]["dont_use_mmap"] is True
        assert type(make_loader(f"dali:data={unequal.parent}", 4, s)).__name__ == "DaliShardLoader"


@pytest.mark.parametrize("loader", ["dali", "torchvision-gpu"])
def test_train_from_shards_under_torchrun(unequal, tmp_path, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    keys, out = tmp_path / "keys", tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "train.py",
           "--data", str(unequal.parent), "--loader", loader, "--out", str(out), "--record-keys", str(keys),
           "--image-size", "8", "--small-stem", "--dim", "32", "--pred-dim", "8", "-b", "16", "-j", "1",
           "--epochs", "1", "--no-knn", "--no-progress", "--log-every", "1"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = ((keys / f"epoch1-rank{r}.txt").read_text().split() for r in range(2))
    assert len(a) == len(b) == 60 // 16 * 8 and not set(a) & set(b)  # equal batch counts, disjoint samples
    history = json.loads((out / "history.json").read_text())
    assert history[-1]["epoch"] == 1 and np.isfinite(history[-1]["loss"])


# ---------------------------------------------------------------------- on a GPU

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["dali", "torchvision-gpu"])
def test_cuda_shard_batches_hold_the_cpu_batches_samples(unequal, name):
    """On a GPU (DALI mixed / nvJPEG): the same samples and labels as on the CPU, on the device;
    torchvision-gpu reads nothing back in the steady state."""
    if name == "dali":
        pytest.importorskip("nvidia.dali")
    source = read_index(unequal)
    runs = {}
    for device in ("cpu", "cuda"):
        loader = build_loader(name, source, recipe(8), batch_size=B, workers=2, device=device, record_keys=True)
        keys, batches = epoch(loader, 1)
        assert all(b.view1.device.type == device for b in batches)
        runs[device] = (keys, torch.cat([b.label.cpu() for b in batches]))
    assert runs["cpu"][0] == runs["cuda"][0] and torch.equal(runs["cpu"][1], runs["cuda"][1])
    if name == "torchvision-gpu":
        it = iter(build_loader(name, source, recipe(8), batch_size=B, workers=2, device="cuda"))
        next(it)
        with count_host_reads() as counts:
            next(it)
        it.close()
        assert sum(counts.values()) == 0, dict(counts)
