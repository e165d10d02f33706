"""The torch loader on real images: pairing, order, sharding, and the recipe's parameter rates."""
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import build_loader, recipe
from pipeline.sources.imagefolder import scan_image_folder
from pipeline.sampling import shard_order
from pipeline.backends.torch.loader import view_transform


def test_views_differ_keep_label_and_layout(fmnist_slice):
    images = scan_image_folder(fmnist_slice / "train")
    loader = build_loader("torch", source=images, aug=recipe(16), batch_size=32, workers=0,
                          channels_last=True, seed=1)
    assert len(loader) == 300 // 32 and loader.num_samples == 300
    loader.set_epoch(0)
    batches = list(loader)
    assert len(batches) == len(loader)
    b = batches[0]
    assert b.view1.shape == b.view2.shape == (32, 3, 16, 16)
    assert b.view1.dtype == torch.float32 and b.label.dtype == torch.int64
    assert b.view1.is_contiguous(memory_format=torch.channels_last)
    assert not torch.allclose(b.view1, b.view2)
    # labels follow the images: the epoch's order maps each label back to its file's class
    order = shard_order(300, seed=1, epoch=0)
    expected = [images.samples[i][1] for i in order[:32]]
    assert b.label.tolist() == expected


def test_epoch_order_deterministic_and_changes(fmnist_slice):
    kw = dict(source=fmnist_slice / "train", aug=recipe(8), batch_size=50, workers=0, seed=3)
    a, b = build_loader("torch", **kw), build_loader("torch", **kw)
    a.set_epoch(2)
    b.set_epoch(2)
    first_a, first_b = next(iter(a)), next(iter(b))
    assert torch.equal(first_a.view1, first_b.view1) and torch.equal(first_a.label, first_b.label)
    a.set_epoch(3)
    assert not torch.equal(next(iter(a)).label, first_a.label)


@pytest.mark.parametrize("world", [2, 3])
def test_shards_disjoint_and_complete(world):
    shards = [shard_order(100, seed=0, epoch=5, rank=r, world_size=world) for r in range(world)]
    flat = [i for s in shards for i in s]
    assert len(set(flat)) == len(flat) == 100 - 100 % world
    assert {len(s) for s in shards} == {100 // world}


def probe_image(side: int = 256) -> Image.Image:
    """R = x ramp, G = y ramp, B = 0: a view's pixels tell where it was cropped from."""
    ramp = np.linspace(0, 255, side).round().astype(np.uint8)
    rgb = np.zeros((side, side, 3), np.uint8)
    rgb[..., 0] = ramp[None, :]
    rgb[..., 1] = ramp[:, None]
    return Image.fromarray(rgb)


def read_back(view: torch.Tensor, aug) -> dict:
    """Crop area fraction, flip and grey of one un-normalised view of :func:`probe_image`."""
    x = view * torch.tensor(aug.std).view(3, 1, 1) + torch.tensor(aug.mean).view(3, 1, 1)
    r, g, b = x * 255
    grey = bool(torch.allclose(r, g, atol=1) and torch.allclose(g, b, atol=1))
    width = (r.max() - r.min()).item() / 255
    height = (g.max() - g.min()).item() / 255
    flipped = bool(r[:, 0].mean() > r[:, -1].mean())
    return {"grey": grey, "area": width * height, "flip": flipped, "ratio": width / max(height, 1e-6)}


def test_recipe_rates_over_many_draws():
    torch.manual_seed(0)
    aug = recipe(32)
    probe = probe_image()
    n = 1500
    full = [read_back(view_transform(aug)(probe), aug) for _ in range(n)]
    grey_rate = np.mean([d["grey"] for d in full])
    assert abs(grey_rate - 0.2) < 3 * np.sqrt(0.2 * 0.8 / n)
    geometric = aug.replace(jitter_p=0.0, grayscale_p=0.0)  # pure crop + flip: read back exactly
    geo = [read_back(view_transform(geometric)(probe), geometric) for _ in range(n)]
    areas = np.array([d["area"] for d in geo])
    ratios = np.array([d["ratio"] for d in geo])
    assert areas.min() > 0.2 * 0.9 and areas.max() <= 1.0 + 1e-6
    assert 0.5 < areas.mean() < 0.7  # U(0.2, 1) area with torchvision's rejection of out-of-image boxes
    assert ratios.min() > 0.75 * 0.9 and ratios.max() < 4 / 3 * 1.1
    flip_rate = np.mean([d["flip"] for d in geo])
    assert abs(flip_rate - 0.5) < 3 * np.sqrt(0.25 / n)


def test_blur_only_on_large_views():
    ops = [type(t).__name__ for t in view_transform(recipe(224)).transforms]
    small = [type(t).__name__ for t in view_transform(recipe(32)).transforms]
    assert ops.count("RandomApply") == 2 and small.count("RandomApply") == 1
    assert recipe(224).blur_kernel == 23


def test_batch_larger_than_data_is_refused(fmnist_slice):
    with pytest.raises(ValueError, match="batch size 512 is larger than the 300 images"):
        build_loader("torch", source=fmnist_slice / "train", aug=recipe(8), batch_size=512, workers=0)


def test_synthetic_loader_shapes():
    loader = build_loader("synthetic", num_samples=100, batch_size=32, size=8, channels_last=True)
    batches = list(loader)
    assert len(batches) == len(loader) == 3
    assert batches[0].view1.shape == (32, 3, 8, 8) and batches[0].view1.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(batches[0].view1, batches[0].view2)


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path):
    from pipeline.sources.imagefolder import load_rgb
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    rgb = np.asarray(load_rgb(str(tmp_path / "g16.png")))
    assert rgb.shape == (64, 64, 3) and rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255
    assert abs(int(rgb[32, 32, 0]) - int(ramp[32, 32]) // 257) <= 1


def test_file_changed_after_the_scan_is_named(photo_folder, tmp_path):
    import shutil
    root = tmp_path / "train"
    shutil.copytree(photo_folder, root)
    images = scan_image_folder(root)
    victim = images.samples[3][0]
    with open(victim, "r+b") as f:
        f.truncate(1000)
    loader = build_loader("torch", source=images, aug=recipe(16), batch_size=22, workers=0)
    with pytest.raises(ValueError, match=f"{victim} no longer decodes .*changed after the scan"):
        next(iter(loader))
