"""torch, DALI and FFCV loaders on one folder of real, odd and broken files: same files, same
pixels, same shards and orders, mid-epoch resume, per-rank augmentations (issues 8 and 11).

The folder ("the zoo") holds 43 decodable images: Fashion-MNIST JPEGs, foolbox ImageNet photos and
odd files made from other photos (a phone-style JPEG with EXIF orientation 6, a GIF and a TGA with
image names DALI cannot decode, a WebP named .jpg, CMYK, grey, palette, RGBA, 16-bit, a 1×1 pixel, a
3-Mpixel photo FFCV must shrink) plus five files that do not decode. All images are square: with
crop area and aspect fixed at 1, a "still" recipe (no colour, no flip) then shows each whole image
in every loader (on a non-square image the crop cannot be found and the fallbacks differ: torch
and FFCV take the centre square, DALI a square at a random place). Each loader runs as rank 0 and
rank 1 of 2 with batch 7 (21 images per rank: 3 batches); every view names its image by nearest
neighbour among PIL references (decoded, turned upright, resized), so order, shards and content are read from
the pixels each loader delivered. A decoy reference of the EXIF photo's stored, unrotated pixels
catches a loader that ignores the orientation.
"""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from pipeline import build_loader, recipe
from pipeline.sources.imagefolder import ImageList, scan_image_folder, to_rgb
from pipeline.sampling import shard_order
from tests.view_probes import pixels

SIZE, BATCH, SEED, WORLD = 32, 7, 5, 2
STILL = recipe(SIZE).replace(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_p=0.0, grayscale_p=0.0,
                             blur_p=0.0, flip_p=0.0)
BACKENDS = ["torch", "dali", "ffcv"]
BAD = {"truncated.jpg", "corrupt.jpg", "empty.jpg", "notes.jpg", "dangling.jpg"}


def _exif6(upright: Image.Image, path: Path) -> None:
    """A phone photo held upright: pixels stored turned 90°, EXIF orientation 6 says how to turn them back."""
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif, quality=95)


def _rgba(im: Image.Image) -> Image.Image:
    out = im.convert("RGBA")
    out.putalpha(128)
    return out


ODD = {  # file name -> how it is written from a (distinct) real photo
    "exif6.jpg": _exif6,
    "gif_named.jpg": lambda im, p: im.convert("P", palette=Image.Palette.ADAPTIVE).save(p, format="GIF"),
    "tga_named.png": lambda im, p: im.save(p, format="TGA"),
    "webp_named.jpg": lambda im, p: im.save(p, format="WEBP", quality=90),
    "cmyk.jpg": lambda im, p: im.convert("CMYK").save(p, quality=95),
    "grey.jpg": lambda im, p: im.convert("L").save(p, quality=95),
    "palette.png": lambda im, p: im.convert("P", palette=Image.Palette.ADAPTIVE).save(p),
    "rgba.png": lambda im, p: _rgba(im).save(p),
    "grey16.png": lambda im, p: Image.fromarray(np.asarray(im.convert("L"), np.uint16) * 257).save(p),
    "one_pixel.png": lambda im, p: Image.new("RGB", (1, 1), (200, 30, 60)).save(p),
    "big.jpg": lambda im, p: im.resize((1800, 1800), Image.Resampling.BICUBIC).save(p, quality=85),
}


@pytest.fixture(scope="module")
def zoo(photo_dir, fmnist_slice, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zoo") / "train"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
    photos = sorted(photo_dir.glob("imagenet_*.jpg"))
    for i, p in enumerate(photos[:10]):
        shutil.copy(p, root / "ab"[i % 2] / p.name)
    sources = photos[10:] + sorted((Path(importlib.util.find_spec("sklearn").submodule_search_locations[0])
                                    / "datasets" / "images").glob("*.jpg"))
    for i, (name, write) in enumerate(ODD.items()):
        with Image.open(sources[i]) as im:
            write(im.convert("RGB").resize((96, 96)), root / "ab"[i % 2] / name)
    fmnist = sorted((fmnist_slice / "train").rglob("*.jpg"))[::13][:43 - 10 - len(ODD)]
    for i, p in enumerate(fmnist):
        shutil.copy(p, root / "ab"[i % 2] / f"fmnist_{p.name}")
    good = photos[2].read_bytes()
    (root / "a" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "a" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8)
    (root / "b" / "empty.jpg").write_bytes(b"")
    (root / "b" / "notes.jpg").write_text("not an image\n")
    (root / "b" / "dangling.jpg").symlink_to(root / "gone.jpg")
    return root


@pytest.fixture(scope="module")
def images(zoo) -> ImageList:
    with pytest.warns(UserWarning, match="skipping 5 undecodable"):
        found = scan_image_folder(zoo)
    return found


def reference(im: Image.Image) -> torch.Tensor:
    assert im.width == im.height
    arr = np.asarray(im.resize((SIZE, SIZE), Image.Resampling.BILINEAR), np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1)


@pytest.fixture(scope="module")
def refs(images) -> torch.Tensor:
    """``(N + 1, 3, S, S)`` pixels: PIL's view of each sample (turned upright by PIL's own
    ``exif_transpose``, not by the code under test), then the decoy (the EXIF photo unrotated)."""
    out = []
    for p, _ in images.samples:
        with Image.open(p) as im:
            out.append(reference(to_rgb(ImageOps.exif_transpose(im))))
    exif = next(p for p, _ in images.samples if p.endswith("exif6.jpg"))
    with Image.open(exif) as im:
        out.append(reference(im.convert("RGB")))  # the stored pixels, as a loader ignoring EXIF would see them
    return torch.stack(out)


def identify(batches, refs: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """Nearest reference of every view1 in ``batches`` and its mean absolute distance (grey levels)."""
    px = torch.cat([pixels(b.view1, STILL) for b in batches]).flatten(1)
    dist = torch.cdist(px, refs.flatten(1)) / px.shape[1] ** 0.5
    best = dist.min(1)
    return best.indices.tolist(), (px - refs.flatten(1)[best.indices]).abs().mean(1)


def build(backend: str, data, rank: int, aug=STILL, **kw):
    common = dict(aug=aug, batch_size=BATCH, seed=SEED, rank=rank, world_size=WORLD, **kw)
    if backend == "torch":
        return build_loader("torch", data, workers=0, **common)
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
        return build_loader("dali", data, workers=2, **common)
    pytest.importorskip("ffcv")
    from pipeline.gpu_augment import GpuAugment
    loader = build_loader("ffcv", data, workers=2, **common)
    loader.colour = GpuAugment(aug, flip=False, normalize=True)
    return loader


@pytest.fixture(scope="module")
def loaders(images, tmp_path_factory):
    """``loaders(backend)`` → its rank 0 and rank 1 loaders on the zoo, built once per module
    (FFCV compiles each loader's pipeline with numba on its first batch: 20-50 s)."""
    made = {}
    cache = tmp_path_factory.mktemp("beton")

    def get(backend: str):
        if backend not in made:
            if backend == "dali":
                with pytest.warns(UserWarning, match=r"DALI cannot decode 2 file\(s\).*GIF/P, TGA/RGB"):
                    made[backend] = [build(backend, images, r) for r in range(WORLD)]
            elif backend == "ffcv":
                made[backend] = [build(backend, images, r, cache_dir=cache) for r in range(WORLD)]
            else:
                made[backend] = [build(backend, images, r) for r in range(WORLD)]
        return made[backend]
    return get


def run(loader, epoch: int, start: int = 0) -> list:
    loader.set_epoch(epoch, start)
    return list(loader)


def test_zoo_scan_names_what_was_skipped_and_what_each_file_is(images):
    assert len(images) == 43 and {Path(p).name for p, _ in images.skipped} == BAD
    kinds = {Path(p).name: k for (p, _), k in zip(images.samples, images.kinds)}
    assert kinds["gif_named.jpg"] == "GIF/P" and kinds["tga_named.png"] == "TGA/RGB"
    assert kinds["webp_named.jpg"] == "WEBP/RGB" and kinds["grey16.png"] == "PNG/I;16"


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_images_same_pixels_disjoint_equal_shards(backend, loaders, images, refs):
    """Every loader delivers exactly shard_order's images, each looking as PIL decodes it (EXIF
    orientation applied, odd formats converted): two ranks, disjoint, equal, together 42 of 43."""
    per_rank = []
    for rank, loader in enumerate(loaders(backend)):
        batches = run(loader, epoch=0)
        assert len(loader) == len(batches) == 3 and all(b.view1.shape[0] == BATCH for b in batches)
        ids, dist = identify(batches, refs)
        assert ids == shard_order(len(images), SEED, 0, rank, WORLD)
        assert torch.cat([b.label for b in batches]).tolist() == [images.samples[i][1] for i in ids]
        worst = int(dist.argmax())
        assert dist.max() < 12, (Path(images.samples[ids[worst]][0]).name, float(dist.max()))
        per_rank.append(ids)
    assert not set(per_rank[0]) & set(per_rank[1])
    assert len(set(per_rank[0]) | set(per_rank[1])) == len(images) - len(images) % WORLD


@pytest.mark.parametrize("backend", BACKENDS)
def test_new_order_each_epoch_and_exact_mid_epoch_resume(backend, loaders, refs):
    loader = loaders(backend)[1]
    epoch1 = run(loader, epoch=1)
    ids1 = identify(epoch1, refs)[0]
    assert ids1 != identify(run(loader, epoch=0), refs)[0]
    resumed = run(loader, epoch=1, start=2)  # a run stopped after 2 of the 3 batches of epoch 1
    assert len(resumed) == 1 and len(loader) == 3
    assert identify(resumed, refs)[0] == ids1[2 * BATCH:]
    assert torch.equal(resumed[0].label, epoch1[2].label)
    if backend == "torch":  # augmentations are per (seed, epoch, image): replayed exactly
        assert torch.equal(resumed[0].view1, epoch1[2].view1) and torch.equal(resumed[0].view2, epoch1[2].view2)
    assert run(loader, epoch=1, start=3) == []
    with pytest.raises(ValueError, match="start batch 4"):
        loader.set_epoch(1, 4)


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_ranks_draw_different_augmentations(backend, photo_dir, tmp_path):
    """43 copies of one photo through the full recipe: the ranks' views differ; the same rank
    built twice gives the same views (the difference is the per-rank seeding, not chance)."""
    photo = str(sorted(photo_dir.glob("imagenet_*.jpg"))[4])
    same = ImageList(str(tmp_path), ["x"], [(photo, 0)] * 43, kinds=["JPEG/RGB"] * 43)
    full = recipe(SIZE)
    a, b, a_again = (next(iter(build(backend, same, r, aug=full))) for r in (0, 1, 0))
    assert torch.equal(a.view1, a_again.view1) and torch.equal(a.view2, a_again.view2)
    differs = (a.view1 - b.view1).abs().flatten(1).mean(1) > 0.01
    assert differs.all(), differs


class ColourProbe:
    """Wraps the FFCV loader's colour stage: each call also applies the stage, with a copy of the
    generator it was given, to one fixed probe batch, so the colour draws can be compared."""

    def __init__(self, stage):
        self.stage, self.probe, self.draws = stage, None, []

    def __call__(self, x, generator):
        if self.probe is None:
            self.probe = torch.randint(0, 256, x.shape, generator=torch.Generator().manual_seed(0),
                                       dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
        copy = torch.Generator(device=x.device).set_state(generator.get_state())
        self.draws.append(self.stage(self.probe.clone(), generator=copy))
        return self.stage(x, generator=generator)


def test_ffcv_colour_draws_per_rank_and_replayed_on_resume(loaders):
    pytest.importorskip("ffcv")
    from pipeline.gpu_augment import GpuAugment
    ranks = loaders("ffcv")
    saved = [r.colour for r in ranks]
    probes = [ColourProbe(GpuAugment(recipe(SIZE), flip=False, normalize=True)) for _ in ranks]
    try:
        for r, p in zip(ranks, probes):
            r.colour = p
            run(r, epoch=2)
        assert len(probes[0].draws) == 6  # 3 batches x 2 views
        for d0, d1 in zip(probes[0].draws, probes[1].draws):
            assert not torch.equal(d0, d1)  # ranks draw their own colour parameters
        uninterrupted = probes[1].draws
        probes[1].draws = []
        run(ranks[1], epoch=2, start=1)
        assert len(probes[1].draws) == 4
        for again, first in zip(probes[1].draws, uninterrupted[2:]):
            assert torch.equal(again, first)  # batch k's colour draws replayed after a resume
    finally:
        for r, c in zip(ranks, saved):
            r.colour = c


def test_knn_and_probe_images_are_decoded_alike(images, refs):
    """The kNN / linear-probe images (pipeline/eval_data.py) are the loaders' images: upright too."""
    from pipeline.eval_data import EvalImages
    evaluated = EvalImages(images, STILL, workers=0)
    assert torch.equal(evaluated.labels, torch.tensor(images.labels))
    dist = (evaluated.images.float() - refs[:-1]).abs().mean((1, 2, 3))
    assert dist.max() < 12, dist
    exif = next(i for i, (p, _) in enumerate(images.samples) if p.endswith("exif6.jpg"))
    assert (evaluated.images[exif].float() - refs[-1]).abs().mean() > 5 * max(float(dist[exif]), 1.0)
