"""The batched colour stage (pipeline/gpu_augment.py): exact ops, per-sample rates, and parity in
distribution with the torch loader's torchvision ops, read back from a probe image.

The probe is a 64×64 image of two saturated colours with a vertical edge at column 16: from an
output one reads whether it was flipped (where the edge is), greyed (channels equal), jittered
(colour changed), blurred (the pixel beside the edge changed), and the colour itself.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from pipeline.augment import recipe
from pipeline.gpu_augment import GpuAugment, adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation, gaussian_blur
from pipeline.backends.torch.loader import view_transform
from tests.host_reads import count_host_reads

AUG = recipe(64).replace(blur_p=0.5)  # 64 px views keep the blur (kernel 7) for the test
EDGE, A, B = 16, (200, 60, 40), (40, 90, 180)
N = 1500


def probe() -> torch.Tensor:
    """(3, 64, 64) uint8: colour A left of column 16, colour B right of it."""
    x = torch.empty(3, 64, 64, dtype=torch.uint8)
    x[:, :, :EDGE] = torch.tensor(A, dtype=torch.uint8).view(3, 1, 1)
    x[:, :, EDGE:] = torch.tensor(B, dtype=torch.uint8).view(3, 1, 1)
    return x


def readback(y: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-sample features of ``(N, 3, 64, 64)`` float outputs in [0, 1] (not normalised)."""
    flipped = (y[:, :, :, 1:] - y[:, :, :, :-1]).abs().sum((1, 2)).argmax(1) > 32
    yf = torch.where(flipped.view(-1, 1, 1, 1), y.flip(-1), y)  # undo the flip to read fixed places
    a = yf[:, :, 24:40, 4:10].mean((2, 3))     # colour A, 6+ px from the edge and the border
    b = yf[:, :, 24:40, 30:50].mean((2, 3))    # colour B
    beside = yf[:, :, 24:40, EDGE - 1].mean(2)  # the A pixel next to the edge
    orig_a = torch.tensor(A) / 255
    grey = (a.amax(1) - a.amin(1) < 3 / 255) & (b.amax(1) - b.amin(1) < 3 / 255)
    jittered = (a - orig_a).abs().amax(1) > 3 / 255
    blurred = (beside - a).abs().amax(1) > 3 / 255
    return {k: v.numpy() for k, v in dict(flip=flipped, grey=grey, jitter=jittered, blur=blurred,
                                          a=a, b=b, lum_a=a.mean(1), lum_b=b.mean(1)).items()}


def gpu_outputs(aug, n=N, seed=0) -> dict[str, np.ndarray]:
    stage = GpuAugment(aug, flip=True, normalize=False)
    g = torch.Generator().manual_seed(seed)
    return readback(stage(probe().expand(n, -1, -1, -1), generator=g))


def torchvision_outputs(aug, n=N, seed=0) -> dict[str, np.ndarray]:
    """The torch loader's own ops (view_transform) minus the crop and the normalisation."""
    ops = [t for t in view_transform(aug).transforms
           if not isinstance(t, (v2.ToImage, v2.RandomResizedCrop, v2.Normalize))]
    tf = v2.Compose(ops)
    torch.manual_seed(seed)
    x = probe()
    return readback(torch.stack([tf(x) for _ in range(n)]))


def binom_tol(p: float, n: int, k: float = 4.5) -> float:
    return k * (p * (1 - p) / n) ** 0.5


@pytest.fixture(scope="module")
def both():
    return gpu_outputs(AUG), torchvision_outputs(AUG)


def test_ops_match_torchvision_functional():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 3, 20, 24, generator=g)
    f = torch.rand(6, generator=g) * 0.8 + 0.6
    h = torch.rand(6, generator=g) * 0.2 - 0.1
    s = torch.rand(6, generator=g) * 1.9 + 0.1
    cases = [(adjust_brightness, TF.adjust_brightness, f), (adjust_contrast, TF.adjust_contrast, f),
             (adjust_saturation, TF.adjust_saturation, f), (adjust_hue, TF.adjust_hue, h)]
    for ours, ref, fac in cases:
        want = torch.stack([ref(x[i], fac[i].item()) for i in range(6)])
        torch.testing.assert_close(ours(x.clone(), fac), want, atol=2e-6, rtol=0)
    want = torch.stack([TF.gaussian_blur(x[i], [7, 7], [s[i].item()] * 2) for i in range(6)])
    torch.testing.assert_close(gaussian_blur(x, s, 7), want, atol=2e-6, rtol=0)


def test_each_op_at_its_rate():
    # sigma >= 1 px makes every blur visible beside the edge; grey off so jitter shows on every sample.
    aug = AUG.replace(blur_sigma=(1.0, 2.0), grayscale_p=0.0)
    r = gpu_outputs(aug)
    for name, p in (("jitter", aug.jitter_p), ("blur", aug.blur_p), ("flip", aug.flip_p)):
        assert abs(r[name].mean() - p) < binom_tol(p, N), (name, r[name].mean(), p)
    r = gpu_outputs(AUG, seed=1)
    assert abs(r["grey"].mean() - AUG.grayscale_p) < binom_tol(AUG.grayscale_p, N)
    off = gpu_outputs(AUG.replace(jitter_p=0, grayscale_p=0, blur_p=0, flip_p=0), n=200)
    assert not (off["jitter"].any() or off["grey"].any() or off["blur"].any() or off["flip"].any())


def test_rates_match_torch_loader(both):
    ours, ref = both
    for name in ("flip", "grey", "jitter", "blur"):
        p = ref[name].mean()
        assert abs(ours[name].mean() - p) < binom_tol(p, N) * 2 ** 0.5, (name, ours[name].mean(), p)


def test_colour_distribution_matches_torch_loader(both):
    ours, ref = both
    for key in ("lum_a", "lum_b"):
        assert ks_2samp(ours[key], ref[key]).pvalue > 1e-3, key
    for c in range(3):
        for key in ("a", "b"):
            assert ks_2samp(ours[key][:, c], ref[key][:, c]).pvalue > 1e-3, (key, c)


def test_parity_check_detects_a_wrong_hue_range(both):
    """The KS comparison above is sensitive: hue in [-0.3, 0.3] instead of [-0.1, 0.1] fails it."""
    _, ref = both
    wrong = gpu_outputs(AUG.replace(hue=0.3))
    assert min(ks_2samp(wrong["a"][:, c], ref["a"][:, c]).pvalue for c in range(3)) < 1e-6


def test_parameters_are_per_sample_and_reproducible():
    stage = GpuAugment(AUG, flip=True)
    x = probe().expand(64, -1, -1, -1)
    y1 = stage(x, generator=torch.Generator().manual_seed(5))
    y2 = stage(x.contiguous(memory_format=torch.channels_last), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(y1, y2)  # same draws → same output, whatever the memory format
    assert y1.dtype == torch.float32 and y1.shape == (64, 3, 64, 64)
    distinct = {tuple(v.flatten()[::97].tolist()) for v in y1}
    assert len(distinct) > 50  # identical inputs, independent draws per sample
    # a batch equals the same samples augmented one at a time with their own parameters
    p = stage.sample_params(8, generator=torch.Generator().manual_seed(6))
    whole = stage.apply(x[:8], p)
    single = torch.cat([stage.apply(x[i:i + 1], {k: v[i:i + 1] for k, v in p.items()}) for i in range(8)])
    torch.testing.assert_close(whole, single, atol=1e-5, rtol=0)


def test_normalises_with_recipe_statistics():
    x = torch.full((4, 3, 8, 8), 255, dtype=torch.uint8)
    off = AUG.replace(jitter_p=0, grayscale_p=0, blur_p=0)
    y = GpuAugment(off)(x)
    want = (1 - torch.tensor(off.mean)) / torch.tensor(off.std)
    torch.testing.assert_close(y[:, :, 0, 0], want.expand(4, 3))


def test_steady_state_makes_no_host_reads():
    """20 calls of the whole stage as it runs on CUDA (jitter in random order, grey, blur, flip,
    normalise) read nothing back from the device: per-sample choices are masks, not index gathers."""
    stage = GpuAugment(AUG, flip=True, selection="masks")
    x = probe().expand(16, -1, -1, -1)
    g = torch.Generator().manual_seed(0)
    stage(x, generator=g)  # first call: per-device constants are made
    with count_host_reads() as counts:
        for _ in range(20):
            stage(x, generator=g)
    assert sum(counts.values()) == 0, dict(counts)


def test_gather_and_masks_agree(photo_dir):
    """The CPU's selection (each op on the samples that draw it) and CUDA's (every op on every
    sample, blended by mask) give the same views for the same parameters, on real photos."""
    imgs = [torch.from_numpy(np.array(Image.open(f).convert("RGB").resize((48, 48)))).permute(2, 0, 1)
            for f in sorted(photo_dir.glob("*.jpg"))]
    x = torch.stack(imgs * 3)
    stages = {sel: GpuAugment(AUG, flip=True, selection=sel) for sel in ("gather", "masks")}
    p = stages["gather"].sample_params(len(x), generator=torch.Generator().manual_seed(9))
    assert 0 < int(p["jitter"].sum()) < len(x) and 0 < int(p["blur"].sum()) < len(x)
    torch.testing.assert_close(stages["gather"].apply(x, p), stages["masks"].apply(x, p), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="selection"):
        GpuAugment(AUG, selection="loop")


def test_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        GpuAugment(AUG)(torch.zeros(3, 8, 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu_rates():
    stage = GpuAugment(AUG, flip=True, normalize=False)
    y = stage(probe().cuda().expand(N, -1, -1, -1), generator=torch.Generator("cuda").manual_seed(0))
    assert y.is_cuda
    r, ref = readback(y.cpu()), torchvision_outputs(AUG)
    for name in ("flip", "grey", "jitter", "blur"):
        assert abs(r[name].mean() - ref[name].mean()) < binom_tol(ref[name].mean(), N) * 2 ** 0.5, name


def test_real_photo_batch(photo_dir):
    """Real photos pass through; greyed samples have equal channels, others keep their colour."""
    imgs = [torch.from_numpy(np.array(Image.open(f).convert("RGB").resize((64, 64)))).permute(2, 0, 1)
            for f in sorted(photo_dir.glob("imagenet_*.jpg"))]
    x = torch.stack(imgs)
    stage = GpuAugment(AUG, normalize=False)
    p = stage.sample_params(len(x), generator=torch.Generator().manual_seed(3))
    y = stage.apply(x, p)
    assert y.min() >= 0 and y.max() <= 1
    spread = (y.amax(1) - y.amin(1)).amax((1, 2))
    assert torch.equal(spread < 1e-6, p["grey"])
