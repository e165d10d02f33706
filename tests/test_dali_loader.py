"""``--loader dali`` on the CPU, on real photos (foolbox ImageNet JPEGs) and real Fashion-MNIST.

Several tests identify which file each delivered view came from: with a "still" recipe (whole
image, square aspect, no colour, no flip) a view is just the resized image, so nearest-neighbour
matching against PIL-decoded references names the file. That checks order, labels and sharding
through the pixels DALI actually delivered, not through the loader's own bookkeeping.
"""
from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from nvidia.dali import backend as dali_backend  # noqa: E402
from scipy import stats  # noqa: E402

from pipeline import build_loader, recipe  # noqa: E402
from pipeline.backends.dali.loader import DaliDecodeError  # noqa: E402
from pipeline.sources.imagefolder import ImageList, scan_image_folder  # noqa: E402
from pipeline.sampling import shard_order  # noqa: E402
from tests.view_probes import pixels as to_pixels, still  # noqa: E402


def references(paths: list[str], size: int) -> torch.Tensor:
    """``(N, 3, size, size)`` float pixels: each file decoded by PIL and resized (the identity oracle)."""
    out = []
    for p in paths:
        with Image.open(p) as im:
            arr = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32)
        out.append(torch.from_numpy(arr).permute(2, 0, 1))
    return torch.stack(out)


def _is_square(path: str) -> bool:
    with Image.open(path) as im:
        return im.width == im.height


def identify(views: torch.Tensor, refs: torch.Tensor, aug) -> list[int]:
    """Index of the nearest reference for each view (views normalised, ``(B, 3, S, S)``)."""
    px = to_pixels(views, aug).flatten(1)
    return torch.cdist(px, refs.flatten(1)).argmin(1).tolist()


# ---------------------------------------------------------------- shapes, layout, pairing, order

# > 64 px: the blur branch is in the graph; 96 px: a truncated 9-tap window, 160 px: DALI's fitted window
@pytest.mark.parametrize("channels_last,dtype,size", [(False, torch.float32, 96), (True, torch.float16, 160)])
def test_shapes_dtype_layout_and_views_differ(photo_folder, channels_last, dtype, size):
    aug = recipe(size)
    loader = build_loader("dali", photo_folder, aug, batch_size=8, workers=2, channels_last=channels_last, dtype=dtype)
    assert len(loader) == 22 // 8 and loader.num_samples == 22
    batches = list(loader)
    assert len(batches) == 2
    for b in batches:
        for v in (b.view1, b.view2):
            assert v.shape == (8, 3, size, size) and v.dtype == dtype and v.device.type == "cpu"
            assert v.is_contiguous(memory_format=torch.channels_last) == channels_last
            assert v.is_contiguous() != channels_last
            assert torch.isfinite(v).all()
            # normalised: roughly zero-mean, unit-scale values, not raw [0, 255] pixels
            assert -3 < v.float().mean() < 3 and v.float().abs().max() < 3.5
        assert b.label.shape == (8,) and b.label.dtype == torch.int64
        # every sample's two views are independent draws: never identical
        diff = (b.view1.float() - b.view2.float()).abs().flatten(1).mean(1)
        assert (diff > 0.02).all(), diff


def test_order_and_labels_follow_the_shared_epoch_order(photo_folder):
    """Which file each view shows (read from its pixels) is shard_order's, with that file's label."""
    found = scan_image_folder(photo_folder)
    square = [(p, lab) for p, lab in found.samples if _is_square(p)]
    images = ImageList(found.root, found.classes, square)  # still views of square photos are the whole photo
    assert len(images) == 19 and set(images.labels) == {0, 1}
    aug = still(32)
    refs = references([p for p, _ in images.samples], 32)
    loader = build_loader("dali", images, aug, batch_size=5, workers=2, seed=3)
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        got, labels = [], []
        for b in loader:
            ids = identify(b.view1, refs, aug)
            assert ids == identify(b.view2, refs, aug)
            got += ids
            labels += b.label.tolist()
        assert got == shard_order(len(images), 3, epoch)[:15]
        assert labels == [images.samples[i][1] for i in got]


# ---------------------------------------------------------------- epochs, buffers, resume, shards

def test_exact_batch_count_over_epochs(fmnist_slice):
    train = fmnist_slice / "train"  # 300 images: 300 / 64 leaves a partial batch of 44
    loader = build_loader("dali", source=train, aug=recipe(16), batch_size=64, workers=2)
    assert len(loader) == 4
    for epoch in range(4):
        loader.set_epoch(epoch)
        sizes = [b.view1.shape[0] for b in loader]
        assert sizes == [64] * 4, (epoch, sizes)
    half = build_loader("dali", train, recipe(16), batch_size=64, rank=1, world_size=2)
    assert len(half) == 2 and [b.label.shape[0] for b in half] == [64, 64]
    with pytest.raises(ValueError, match="batch size 301"):
        build_loader("dali", train, recipe(16), batch_size=301)


def test_serial_and_overlapped_dali_deliver_the_same_batches(fmnist_slice, monkeypatch):
    """``overlap=False`` runs DALI serially (synchronous, one batch deep); the default is DALI's pipelined
    executor. Both read the same images with the same augmentation draws."""
    import pipeline.backends.dali.loader as dali_loader
    built = []  # the executor keywords of every real pipeline built
    real = dali_loader.simsiam_pipeline
    monkeypatch.setattr(dali_loader, "simsiam_pipeline", lambda *a, **kw: built.append(
        {k: kw[k] for k in ("exec_async", "exec_pipelined", "prefetch_queue_depth")}) or real(*a, **kw))
    train = scan_image_folder(fmnist_slice / "train")
    epochs = {}
    for overlap in (False, None):
        loader = build_loader("dali", train, recipe(16), batch_size=64, workers=2, seed=3, prefetch=3, overlap=overlap)
        loader.set_epoch(1)
        epochs[overlap] = list(loader)
    assert built == [dict(exec_async=False, exec_pipelined=False, prefetch_queue_depth=1),
                     dict(exec_async=True, exec_pipelined=True, prefetch_queue_depth=3)]
    assert len(epochs[False]) == len(epochs[None]) == 4
    for a, b in zip(epochs[False], epochs[None]):
        assert torch.equal(a.label, b.label) and torch.equal(a.view1, b.view1) and torch.equal(a.view2, b.view2)


@pytest.mark.parametrize("overlap", [False, True])
def test_held_batch_is_not_overwritten(fmnist_slice, overlap):
    loader = build_loader("dali", fmnist_slice / "train", recipe(16), batch_size=32, workers=2, prefetch=2,
                          overlap=overlap)
    it = iter(loader)
    first = next(it)
    saved = [t.clone() for t in first]
    rest = list(it)  # 8 more batches: several times the prefetch depth
    assert len(rest) == 8
    for kept, copy in zip(first, saved):
        assert torch.equal(kept, copy)
    assert not any(torch.equal(first.view1, b.view1) for b in rest)


def test_resume_replays_the_uninterrupted_epoch(fmnist_slice):
    train = scan_image_folder(fmnist_slice / "train")
    run = build_loader("dali", train, recipe(16), batch_size=64, workers=2, seed=7)
    epochs = []
    for epoch in (0, 1):
        run.set_epoch(epoch)
        epochs.append(list(run))
    resumed = build_loader("dali", train, recipe(16), batch_size=64, workers=1, seed=7)  # new process, other threads
    resumed.set_epoch(1)
    again = list(resumed)
    assert len(again) == len(epochs[1]) == 4
    for a, b in zip(again, epochs[1]):
        assert torch.equal(a.label, b.label) and torch.equal(a.view1, b.view1) and torch.equal(a.view2, b.view2)
    # ...and epoch 1 is not epoch 0 replayed (DALI#2849)
    assert not torch.equal(torch.cat([b.label for b in epochs[0]]), torch.cat([b.label for b in epochs[1]]))
    assert not torch.equal(epochs[0][0].view1, epochs[1][0].view1)


@pytest.mark.parametrize("world_size", [2, 3])
def test_shards_are_disjoint_and_complete(fmnist_slice, world_size):
    images = scan_image_folder(fmnist_slice / "train")  # 300 images, Fashion-MNIST's 28 px
    aug = still(28)
    refs = references([p for p, _ in images.samples], 28)
    batch = 300 // world_size // 2
    seen = []
    for rank in range(world_size):
        loader = build_loader("dali", images, aug, batch_size=batch, workers=2, seed=11, rank=rank, world_size=world_size)
        loader.set_epoch(2)
        ids = [i for b in loader for i in identify(b.view1, refs, aug)]
        labels = [lab for b in loader for lab in b.label.tolist()]
        assert labels == [images.samples[i][1] for i in ids]
        seen.append(ids)
    assert all(len(s) == 300 // world_size for s in seen)
    assert sorted(i for s in seen for i in s) == list(range(300))


# ---------------------------------------------------------------- parity with the torch loader

def coordinate_probe(path: Path) -> str:
    """A 256×256 lossless PNG whose red channel is the column and green the row (blue 0): the
    crop window and flip of a view can be read back from its pixels, and grey views have R=G=B."""
    ramp = np.arange(256, dtype=np.uint8)
    img = np.zeros((256, 256, 3), np.uint8)
    img[..., 0] = ramp[None, :]
    img[..., 1] = ramp[:, None]
    Image.fromarray(img).save(path)
    return str(path)


def read_back(views: torch.Tensor, aug) -> dict[str, np.ndarray]:
    """Per view: grey flag; for colour views crop area (fraction), aspect ratio (w/h) and flip."""
    px = to_pixels(views, aug)
    s = px.shape[-1]
    grey = ((px[:, 0] - px[:, 1]).abs().amax((1, 2)) < 0.5) & ((px[:, 1] - px[:, 2]).abs().amax((1, 2)) < 0.5)
    j = torch.arange(s, dtype=torch.float32) - (s - 1) / 2
    col = px[:, 0].mean(1)  # red along x
    row = px[:, 1].mean(2)  # green along y
    slope_x = (col * j).sum(1) / (j * j).sum()
    slope_y = (row * j).sum(1) / (j * j).sum()
    w, h = slope_x.abs() * s, slope_y * s  # source pixels spanned by the view
    colour = ~grey
    return dict(grey=grey.numpy(), area=(w * h / 256**2)[colour].numpy(),
                ratio=(w / h)[colour].numpy(), flip=(slope_x < 0)[colour].numpy())


def collect(loader, aug) -> dict[str, np.ndarray]:
    parts = [read_back(v, aug) for b in loader for v in (b.view1, b.view2)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_parity_with_torch_loader_crop_flip_grey(tmp_path):
    probe = coordinate_probe(tmp_path / "probe.png")
    images = ImageList(str(tmp_path), ["probe"], [(probe, 0)] * 512)
    aug = recipe(32).replace(jitter_p=0.0)  # colour jitter would scramble the coordinates
    dali = collect(build_loader("dali", images, aug, batch_size=128, workers=2, seed=1), aug)
    ref = collect(build_loader("torch", images, aug, batch_size=128, workers=0, seed=2), aug)
    n = 1024
    for name, stats_ in (("dali", dali), ("torch", ref)):
        # the recipe's own ranges (small slack for reading a resampled ramp back)
        assert stats_["area"].min() > 0.2 * 0.93 and stats_["area"].max() < 1.03, name
        assert stats_["ratio"].min() > 0.75 * 0.95 and stats_["ratio"].max() < 4 / 3 * 1.05, name
        # rates against the recipe's p, within 4.5 binomial standard errors
        assert abs(stats_["grey"].mean() - 0.2) < 4.5 * math.sqrt(0.2 * 0.8 / n), name
        m = len(stats_["flip"])
        assert abs(stats_["flip"].mean() - 0.5) < 4.5 * math.sqrt(0.25 / m), name
    # the two loaders' distributions agree (two-sample KS; a 0.001 false-alarm rate)
    assert stats.ks_2samp(dali["area"], ref["area"]).pvalue > 1e-3
    assert stats.ks_2samp(np.log(dali["ratio"]), np.log(ref["ratio"])).pvalue > 1e-3
    assert abs(dali["area"].mean() - ref["area"].mean()) < 0.04


def test_hue_is_a_fraction_of_a_turn(photo_dir):
    """``aug.hue = 0.1`` (a fraction of a turn) must become +-36 degrees for ``fn.color_twist``:
    a hue-only jitter changes a real photo about as much in DALI as in torchvision (hue left in
    turns changes nothing; twice the angle changes it about twice as much)."""
    photo = str(sorted(photo_dir.glob("imagenet_*.jpg"))[0])
    images = ImageList(str(photo_dir), ["x"], [(photo, 0)] * 64)
    base = still(32)
    hue_only = base.replace(jitter_p=1.0, brightness=0.0, contrast=0.0, saturation=0.0)
    change = {}
    for name, kw in (("dali", {}), ("torch", {"workers": 0})):
        plain = next(iter(build_loader(name, images, base, batch_size=64, **kw))).view1
        shifted = next(iter(build_loader(name, images, hue_only, batch_size=64, **kw))).view1
        change[name] = (to_pixels(shifted, base) - to_pixels(plain, base)).abs().mean().item()
    assert 0.6 * change["torch"] < change["dali"] < 1.6 * change["torch"], change


# ---------------------------------------------------------------- bad input

def _odd_file(kind: str, src: Image.Image, folder: Path) -> None:
    if kind == "cmyk_jpeg":
        src.convert("CMYK").save(folder / "cmyk.jpg")
    elif kind == "grey_jpeg":
        src.convert("L").save(folder / "grey.jpg")
    elif kind == "png_among_jpegs":
        src.save(folder / "really_a_png.jpg", format="PNG")
        src.save(folder / "plain.png")
    elif kind == "one_pixel":
        src.resize((1, 1)).save(folder / "one.jpg")
    elif kind == "8000x8000":
        src.resize((8000, 8000), Image.NEAREST).save(folder / "huge.jpg", quality=70)


@pytest.mark.parametrize("kind", ["cmyk_jpeg", "grey_jpeg", "png_among_jpegs", "one_pixel", "8000x8000"])
def test_odd_but_valid_files_decode_like_pil(photo_dir, tmp_path, monkeypatch, kind):
    """Files PIL decodes must decode in DALI too, to the same pixels (as the torch loader's)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "train" / "c"
    folder.mkdir(parents=True)
    photos = sorted(photo_dir.glob("imagenet_*.jpg"))[:2]
    for p in photos:
        shutil.copy(p, folder / p.name)
    with Image.open(photos[0]) as im:
        _odd_file(kind, im.convert("RGB"), folder)
    images = scan_image_folder(tmp_path / "train")
    assert not images.skipped
    n = len(images)
    aug = still(32)
    t0 = time.time()
    (dali,) = list(build_loader("dali", images, aug, batch_size=n, seed=5))
    (ref,) = list(build_loader("torch", images, aug, batch_size=n, workers=0, seed=5))
    assert time.time() - t0 < 60
    assert torch.equal(dali.label, ref.label)
    diff = (to_pixels(dali.view1, aug) - to_pixels(ref.view1, aug)).abs().mean((1, 2, 3))
    assert (diff < 6).all(), diff  # grey levels; an inverted CMYK or a dropped channel is ~100


def test_undecodable_files_skipped_like_the_torch_loader(photo_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = tmp_path / "train"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
    photos = sorted(photo_dir.glob("imagenet_*.jpg"))[:6]
    for i, p in enumerate(photos):
        shutil.copy(p, root / ("a" if i % 2 else "b") / p.name)
    (root / "a" / "truncated.jpg").write_bytes(photos[0].read_bytes()[:2000])
    (root / "b" / "not_an_image.jpg").write_bytes(b"hello, I am text\n" * 50)
    (root / "b" / "notes.txt").write_text("not an image extension: ignored like ImageFolder does")
    (root / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        build_loader("dali", root, recipe(32), batch_size=2)
    (root / "empty").rmdir()
    with pytest.warns(UserWarning, match="skipping 2 undecodable"):
        loader = build_loader("dali", root, recipe(32), batch_size=2)
    assert loader.num_samples == 6 and len(loader) == 3
    assert sum(b.view1.shape[0] for b in loader) == 6


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_file_dali_cannot_decode_stops_with_its_name(photo_dir, tmp_path, damage):
    """A file that reaches DALI and fails (e.g. changed after the cached PIL check) stops the
    epoch with an error naming it: from DALI's own message (truncated) or by the one-by-one check
    (garbage, where DALI's message names no file). Never a hang; the next epoch works again."""
    photos = [str(p) for p in sorted(photo_dir.glob("imagenet_*.jpg"))[:9]]
    bad = tmp_path / f"{damage}.jpg"
    bad.write_bytes(Path(photos[0]).read_bytes()[:3000] if damage == "truncated" else b"\x00garbage" * 100)
    images = ImageList(str(tmp_path), ["x"], [(p, 0) for p in photos] + [(str(bad), 0)])
    loader = build_loader("dali", images, recipe(32), batch_size=2, workers=2)
    t0 = time.time()
    with pytest.raises(DaliDecodeError, match=str(bad)):
        for _ in loader:
            pass
    assert time.time() - t0 < 30
    good = build_loader("dali", ImageList(str(tmp_path), ["x"], [(p, 0) for p in photos]), recipe(32), batch_size=3)
    assert len(list(good)) == 3


@pytest.mark.skipif(dali_backend.GetCUDADeviceCount() > 0, reason="a GPU is visible to DALI")
def test_gpu_asked_without_gpu_is_one_sentence(photo_folder):
    with pytest.raises(ValueError) as info:
        build_loader("dali", source=photo_folder, aug=recipe(32), batch_size=4, device="cuda")
    msg = str(info.value)
    assert "\n" not in msg and "--device cpu" in msg and "GPU" in msg
