"""FFCV writer and loader (pipeline/backends/ffcv/write.py, pipeline/backends/ffcv/loader.py) on real photos,
Fashion-MNIST and read-back probes.

FFCV compiles its pipeline with numba on the first batch (20-50 s here), so every test that
iterates batches shares ONE module-scoped loader. Its data set is an ImageFolder of real photos
(class ``photos``) plus "probe" images (classes ``p0``-``p2``) whose pixels encode their position
(R = x, G = y, 0-255 on a 256×256 image) and their class (B = 40·label + 20): any crop of a
probe can be read back (area, aspect, flip) and checked against its label.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp

pytest.importorskip("ffcv")

from pipeline import build_loader  # noqa: E402
from pipeline.augment import AugmentConfig  # noqa: E402
from pipeline.backends.ffcv.write import MAX_RGB_PIXELS, PAGE_BYTES, BetonError, check_beton, sidecar_path, write_beton  # noqa: E402
from pipeline.gpu_augment import GpuAugment  # noqa: E402
from pipeline.sources.imagefolder import ImageList, scan_image_folder  # noqa: E402
from pipeline.sampling import shard_order  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
AUG = AugmentConfig(size=32, blur_p=0.5)
PROBES_PER_CLASS, BATCH = 36, 32
NO_COLOUR = AUG.replace(jitter_p=0, grayscale_p=0, blur_p=0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def probe_image(label: int) -> Image.Image:
    x, y = np.meshgrid(np.arange(256), np.arange(256))
    return Image.fromarray(np.stack([x, y, np.full_like(x, 40 * label + 20)], -1).astype(np.uint8))


def stored_pixels(reader, beton: Path, i: int) -> np.ndarray:
    """The raw (write_mode='raw') pixels of sample ``i`` straight from the file: (H, W, 3) uint8."""
    mode, w, h, ptr = reader.metadata["f0"][i]
    assert mode == 1, "expected a raw-stored image"
    return np.fromfile(beton, dtype=np.uint8, count=int(h) * int(w) * 3, offset=int(ptr)).reshape(h, w, 3)


def read_crops(views: torch.Tensor) -> dict[str, np.ndarray]:
    """Crop box of probe views ``(N, 3, 32, 32)`` in [0, 1]: interior columns/rows 8 and 23 avoid
    the resize filters' borders, so both loaders' resizers read the ramp exactly."""
    r, g = views[:, 0] * 255, views[:, 1] * 255
    c8, c23 = r[:, :, 8].mean(1), r[:, :, 23].mean(1)
    flipped = c23 < c8
    w = (c23 - c8).abs() * 32 / 15
    h = (g[:, 23, :].mean(1) - g[:, 8, :].mean(1)) * 32 / 15
    return {"area": (w * h / 256 ** 2).numpy(), "log_aspect": torch.log(w / h).numpy(), "flip": flipped.numpy()}


@pytest.fixture(scope="module")
def probe_split(photo_folder, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ffcv_probe") / "train"
    shutil.copytree(photo_folder / "even", root / "photos")
    for f in (photo_folder / "odd").iterdir():
        shutil.copy(f, root / "photos" / f.name)
    for label in range(3):
        (root / f"p{label}").mkdir(parents=True)
        im = probe_image(label)
        for k in range(PROBES_PER_CLASS):
            im.save(root / f"p{label}" / f"probe_{k:03d}.png")
    return root


@pytest.fixture(scope="module")
def shared(probe_split, tmp_path_factory):
    """The one compiled loader: ImageFolder split → .beton (written on demand) → two views."""
    images = scan_image_folder(probe_split)
    cache = tmp_path_factory.mktemp("ffcv_cache")
    loader = build_loader("ffcv", images, aug=AUG, batch_size=BATCH, workers=2, channels_last=True, seed=0,
                        cache_dir=cache)
    return loader, images


def test_writer_round_trip_pixels_and_labels(photo_folder, tmp_path):
    images = scan_image_folder(photo_folder)
    out = write_beton(images, tmp_path / "photos.beton", num_workers=2, progress=False)
    reader = check_beton(out)
    assert reader.num_samples == len(images)
    assert reader.metadata["f1"].tolist() == images.labels  # IntField labels = the torch loader's
    for i, (path, _) in enumerate(images.samples):
        with Image.open(path) as im:
            np.testing.assert_array_equal(stored_pixels(reader, out, i), np.asarray(im.convert("RGB")))
    meta = json.loads(sidecar_path(out).read_text())
    assert meta["classes"] == images.classes and meta["num_samples"] == len(images)


def test_writer_refuses_overwrite_and_leaves_no_half_file(photo_folder, tmp_path, monkeypatch):
    out = write_beton(photo_folder, tmp_path / "a.beton", num_workers=1, progress=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        write_beton(photo_folder, out, num_workers=1, progress=False)
    before = out.stat().st_mtime_ns
    write_beton(photo_folder, out, num_workers=1, overwrite=True, progress=False)
    assert out.stat().st_mtime_ns != before

    from ffcv.writer import DatasetWriter

    def interrupted(self, allocations):
        raise KeyboardInterrupt
    monkeypatch.setattr(DatasetWriter, "finalize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_beton(photo_folder, tmp_path / "b.beton", num_workers=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.beton", "a.beton.json"]


def test_writer_bad_inputs_converted_or_skipped(photo_dir, tmp_path):
    """Each bad input of issue 4, through the command line, under a timeout (a hang fails)."""
    photo = photo_dir / "imagenet_00_243.jpg"
    if not photo.exists():
        photo = sorted(photo_dir.glob("imagenet_*.jpg"))[0]
    cls = tmp_path / "train" / "mixed"
    cls.mkdir(parents=True)
    data = photo.read_bytes()
    shutil.copy(photo, cls / "good.jpg")
    (cls / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" + os.urandom(2000))
    (cls / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (cls / "notes.jpg").write_text("this is a text file with an image extension\n")
    (cls / "README.txt").write_text("ignored: no image extension\n")
    with Image.open(photo) as im:
        rgb = im.convert("RGB")
    rgb.convert("L").save(cls / "grey.jpg")
    rgb.convert("CMYK").save(cls / "cmyk.jpg")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(cls / "rgba.png")
    rgb.resize((1, 1)).save(cls / "one_pixel.png")
    rgb.resize((8000, 6000)).save(cls / "huge.jpg", quality=80)
    out = tmp_path / "mixed.beton"
    run = subprocess.run([sys.executable, "-m", "pipeline.backends.ffcv.write", str(tmp_path / "train"), str(out),
                          "--max-resolution", "512", "-j", "2"],
                         cwd=REPO, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr
    assert "skipping 3 undecodable file(s)" in run.stderr
    for name in ("corrupt.jpg", "truncated.jpg", "notes.jpg"):
        assert name in run.stderr
    reader = check_beton(out)
    with pytest.warns(UserWarning, match="skipping 3 undecodable"):
        names = [Path(p).name for p, _ in scan_image_folder(tmp_path / "train").samples]
    assert names == ["cmyk.jpg", "good.jpg", "grey.jpg", "huge.jpg", "one_pixel.png", "rgba.png"]
    px = {n: stored_pixels(reader, out, i) for i, n in enumerate(names)}
    assert px["one_pixel.png"].shape == (1, 1, 3)
    assert max(px["huge.jpg"].shape[:2]) == 512 and px["huge.jpg"].shape[:2] == (384, 512)
    g = px["grey.jpg"].astype(int)
    assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
    np.testing.assert_array_equal(px["rgba.png"], np.asarray(rgba.convert("RGB")))
    assert px["cmyk.jpg"].shape == px["good.jpg"].shape
    assert np.abs(px["cmyk.jpg"].astype(int) - px["good.jpg"].astype(int)).mean() < 12  # same photo, re-encoded


def test_writer_fits_huge_and_16_bit_images_says_so_and_stores_upright(photo_dir, tmp_path):
    """Without --max-resolution a raw 2500×2500 image exceeds FFCV's 8 MiB page (its worker raised
    and the writer hung): it is shrunk, and the writer says so in its output, the sidecar and
    --help; a 16-bit PNG was clipped to white by PIL's convert('RGB'); a phone photo with EXIF
    orientation 6 is stored upright, as DALI and the torch loader decode it."""
    cls = tmp_path / "train" / "odd"
    cls.mkdir(parents=True)
    with Image.open(photo_dir / "imagenet_00_243.jpg") as im:
        upright = im.convert("RGB").resize((160, 120))
        im.convert("RGB").resize((2500, 2500)).save(cls / "huge.jpg", quality=80)
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(cls / "grey16.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(cls / "phone.jpg", exif=exif, quality=95)
    out = tmp_path / "odd.beton"
    run = subprocess.run([sys.executable, "-m", "pipeline.backends.ffcv.write", str(tmp_path / "train"), str(out), "-j", "1"],
                         cwd=REPO, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr
    assert f"stored 1 of 3 image(s) smaller than in their files (longest side unlimited, at most {MAX_RGB_PIXELS} " \
           f"pixels): largest {cls / 'huge.jpg'} 2500x2500 -> 1665x1665" in run.stderr
    reader = check_beton(out)
    grey16, huge, phone = (stored_pixels(reader, out, i) for i in range(3))
    assert huge.nbytes <= PAGE_BYTES and huge.shape == (1665, 1665, 3)
    assert grey16.shape == (64, 64, 3) and grey16.min() == 0 and grey16.max() == 255
    assert abs(int(grey16[32, 32, 0]) - int(ramp[32, 32]) // 257) <= 1
    assert phone.shape == (120, 160, 3) and np.abs(phone.astype(int) - np.asarray(upright, int)).mean() < 4
    meta = json.loads(sidecar_path(out).read_text())
    assert meta["max_resolution"] is None and meta["max_pixels"] == MAX_RGB_PIXELS
    assert meta["downscaled"] == {"count": 1, "largest": [{"file": str(cls / "huge.jpg"), "size": [2500, 2500],
                                                           "stored": [1665, 1665]}]}
    helped = subprocess.run([sys.executable, "-m", "pipeline.backends.ffcv.write", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert f"an image over {MAX_RGB_PIXELS} pixels" in " ".join(helped.stdout.split())


def test_fashion_mnist_beton_in_one_command(fmnist_slice, tmp_path):
    out = tmp_path / "fmnist-train.beton"
    run = subprocess.run([sys.executable, "-m", "pipeline.backends.ffcv.write", str(fmnist_slice / "train"), str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr
    # stderr is a pipe, not a terminal: the writer's two lines and none of FFCV's bar refreshes
    assert "\r" not in run.stderr and "300/300" not in run.stderr
    assert run.stderr.startswith("writing 300 images of ") and f"\nwrote {out} (" in run.stderr
    reader = check_beton(out)
    images = scan_image_folder(fmnist_slice / "train")
    assert reader.metadata["f1"].tolist() == images.labels
    first = stored_pixels(reader, out, 0)
    with Image.open(images.samples[0][0]) as im:
        np.testing.assert_array_equal(first, np.asarray(im.convert("RGB")))  # grey JPEG → 3 equal channels
    again = subprocess.run([sys.executable, "-m", "pipeline.backends.ffcv.write", str(fmnist_slice / "train"), str(out)],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "exists" in again.stderr


def test_bad_beton_clear_errors(photo_folder, tmp_path):
    good = write_beton(photo_folder, tmp_path / "good.beton", num_workers=1, progress=False)
    truncated = tmp_path / "truncated.beton"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    tail_cut = tmp_path / "tail_cut.beton"  # the allocation table at the end loses entries
    tail_cut.write_bytes(good.read_bytes()[:-100])
    garbage = tmp_path / "garbage.beton"
    garbage.write_bytes(os.urandom(5000))
    for path, match in ((truncated, "truncated"), (tail_cut, "truncated"), (garbage, "not a readable FFCV"),
                        (tmp_path / "missing.beton", "does not exist")):
        with pytest.raises(BetonError, match=match):
            build_loader("ffcv", path, aug=AUG, batch_size=4)

    from ffcv.fields import FloatField, RGBImageField
    from ffcv.writer import DatasetWriter

    class Floats:
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return np.zeros((8, 8, 3), np.uint8), float(i)
    wrong = tmp_path / "wrong.beton"
    DatasetWriter(str(wrong), {"image": RGBImageField(), "label": FloatField()}, num_workers=1).from_indexed_dataset(Floats())
    with pytest.raises(BetonError, match="IntField"):
        build_loader("ffcv", wrong, aug=AUG, batch_size=4)


def test_argument_errors_before_compiling(photo_folder, tmp_path):
    beton = write_beton(photo_folder, tmp_path / "p.beton", num_workers=1, progress=False)
    with pytest.raises(ValueError, match=r"rank 2 outside world size 2 \(ranks are 0..1\)"):
        build_loader("ffcv", beton, aug=AUG, batch_size=4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="world size must be an integer >= 1"):
        build_loader("ffcv", beton, aug=AUG, batch_size=4, world_size=0)
    with pytest.raises(ValueError, match="one process"):
        build_loader("ffcv", beton, aug=AUG, batch_size=4, rank=0, world_size=2, order="quasi_random")
    with pytest.raises(ValueError, match="larger than"):
        build_loader("ffcv", beton, aug=AUG, batch_size=1000)
    with pytest.raises(ValueError, match="larger than the 11 images"):  # 22 photos, 2 ranks: 11 each
        build_loader("ffcv", beton, aug=AUG, batch_size=12, rank=1, world_size=2)
    with pytest.raises(ValueError, match="order"):
        build_loader("ffcv", beton, aug=AUG, batch_size=4, order="shuffled")


def test_building_a_loader_leaves_numba_types_alone(photo_folder, tmp_path):
    """FFCV's reader set ``mutable = False`` on numba's shared ``uint8[::1]`` type, which later made
    numba's dispatcher finalisers raise KeyError (see pipeline/backends/ffcv/runtime.py)."""
    import numba as nb
    shared_type = nb.uint8[::1]
    beton = write_beton(photo_folder, tmp_path / "p.beton", num_workers=1, progress=False)
    build_loader("ffcv", beton, aug=AUG, batch_size=4)  # compiles FFCV's reader (the pipeline waits for a batch)
    assert shared_type.mutable and nb.uint8[::1] is shared_type


def test_quasi_random_order_depends_on_seed_and_epoch_only(photo_folder, tmp_path):
    beton = write_beton(photo_folder, tmp_path / "q.beton", num_workers=1, progress=False)
    loader = build_loader("ffcv", beton, aug=AUG, batch_size=4, order="quasi_random", os_cache=False, seed=3)
    first = loader.epoch_order(3)
    loader.epoch_order(4)
    assert np.array_equal(loader.epoch_order(3), first)  # FFCV's own shuffles its page table in place
    assert len(first) == len(loader) * 4 and len(set(first.tolist())) == len(first)
    assert np.array_equal(loader.epoch_order(3, start=2), first[8:])


def test_batches_two_views_on_device(shared):
    loader, images = shared
    assert len(loader) == len(images) // BATCH and loader.num_samples == len(images)
    ops = [type(op).__name__ for op in loader.loader.pipeline_specs["image2"].transforms]
    assert "ToDevice" not in ops and "NormalizeImage" not in ops  # CPU: no driver error, no ffcv#396 hang
    threads = torch.get_num_threads()
    batches = list(loader)
    assert len(batches) == len(loader)
    assert torch.get_num_threads() == threads  # FFCV's set_num_threads is undone
    grey = []
    for b in batches:
        assert b.view1.shape == b.view2.shape == (BATCH, 3, 32, 32)
        assert b.view1.dtype == torch.float32 and b.label.dtype == torch.int64 and b.label.shape == (BATCH,)
        assert b.view1.is_contiguous(memory_format=torch.channels_last)
        assert not torch.equal(b.view1, b.view2)
        probe = b.label < 3
        v = b.view1[probe] * torch.tensor(AUG.std).view(1, 3, 1, 1) + torch.tensor(AUG.mean).view(1, 3, 1, 1)
        grey.append(((v.amax(1) - v.amin(1)).amax((1, 2)) < 1e-3).float())
        assert v.min() > -1e-3 and v.max() < 1 + 1e-3  # normalised with the recipe's mean/std
    grey_rate = torch.cat(grey).mean().item()
    assert abs(grey_rate - AUG.grayscale_p) < 0.12, grey_rate  # colour stage ran (p=0.2 grey)


def test_views_pair_with_label_and_match_torch_crops(shared, probe_split):
    """With the colour stage off, read each probe view's crop back: labels pair with the right
    image, the two views differ, and crop area / aspect / flip match the torch loader's."""
    loader, images = shared
    loader.colour = GpuAugment(NO_COLOUR)
    views, pairs = [], []
    try:
        for epoch in range(5):
            loader.set_epoch(epoch)
            for b in loader:
                probe = b.label < 3
                for v in (b.view1[probe], b.view2[probe]):
                    expect = (40 * b.label[probe] + 20).float().view(-1, 1, 1) / 255
                    assert (v[:, 2] - expect).abs().max() < 1.5 / 255  # B channel = this sample's label
                    views.append(v)
                pairs.append((b.view1[probe] - b.view2[probe]).abs().flatten(1).amax(1) > 0)
    finally:
        loader.colour = GpuAugment(loader.aug)
    ffcv = read_crops(torch.cat(views))
    assert torch.cat(pairs).float().mean() > 0.95  # two independent crops per image
    probe_only = ImageList(str(probe_split), images.classes, [s for s in images.samples if s[1] < 3])
    ref_loader = build_loader("torch", probe_only, NO_COLOUR, batch_size=54, workers=0, seed=1)
    ref_views = []
    for epoch in range(5):
        ref_loader.set_epoch(epoch)
        ref_views += [torch.cat([b.view1, b.view2]) for b in ref_loader]
    ref = read_crops(torch.cat(ref_views))
    n = len(ffcv["area"])
    assert n > 800
    assert ffcv["area"].min() > 0.18 and ffcv["area"].max() < 1.02
    assert np.abs(ffcv["log_aspect"]).max() < np.log(4 / 3) + 0.05
    for key in ("area", "log_aspect"):
        assert ks_2samp(ffcv[key], ref[key]).pvalue > 1e-3, key
    tol = 4.5 * (0.25 / n + 0.25 / len(ref["flip"])) ** 0.5
    assert abs(ffcv["flip"].mean() - ref["flip"].mean()) < tol and abs(ffcv["flip"].mean() - 0.5) < tol


def test_set_epoch_and_resume_order(shared):
    loader, images = shared
    labels = torch.tensor(images.labels)

    def epoch_labels(e):
        loader.set_epoch(e)
        return torch.cat([b.label for b in loader])
    first = epoch_labels(2)
    assert torch.equal(first, torch.cat([b.label for b in loader]))  # set_epoch holds: no silent advance
    assert not torch.equal(first, epoch_labels(3))
    # a fresh loader (a resumed run) reads the shared order: the torch and DALI loaders' order
    fresh = build_loader("ffcv", source=loader.beton, aug=AUG, batch_size=BATCH, seed=0)
    order = shard_order(len(images), 0, 2)[: len(fresh) * BATCH]
    assert fresh.epoch_order(2).tolist() == order
    assert torch.equal(first, labels[order])
