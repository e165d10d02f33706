"""Batched on-device SimSiam colour stage: jitter, grayscale, blur, (flip), normalise.

One call augments a whole ``(B, 3, H, W)`` batch where it already lives (CPU or CUDA). Each
sample's random parameters are drawn as tensors of length ``B``; samples are never looped over
in Python (the loops below run over the 4 jitter steps × 4 operations, independent of ``B``).

The operations and constants are torchvision's (``transforms.v2``), which the torch loader
applies image by image (:func:`pipeline.backends.torch.loader.view_transform`, after the official
``main_simsiam.py`` / MoCo v2 recipe):

- ``RandomApply([ColorJitter(b, c, s, h)], p=jitter_p)``: factors ``U[1-b, 1+b]`` etc., hue shift
  ``U[-h, h]`` of a turn; the four adjustments in a random order per sample (torchvision draws
  ``randperm(4)`` per call), each clamped to [0, 1]. Brightness ``clamp(f·x)``; contrast blends
  with the image's mean grey; saturation blends with its grey image; hue rotates in HSV.
- ``RandomGrayscale(p)``: ITU-R 601-2 luma ``0.2989 R + 0.587 G + 0.114 B`` on all 3 channels.
- ``RandomApply([GaussianBlur(k, sigma=(lo, hi))], p=blur_p)``: ``σ ~ U[lo, hi]`` pixels per
  sample, ``k = aug.blur_kernel`` taps, separable, reflect padding.
- ``RandomHorizontalFlip(flip_p)`` (optional: FFCV and DALI flip while decoding).
- ``Normalize(mean, std)`` (optional).

Output differs from torchvision's only by rounding: torchvision works on uint8 tensors and rounds
after each op; this stage stays in float32.

No host syncs: every per-sample choice is a mask or a per-sample factor (identity where a sample
is not augmented), never an index gather, so the stage reads nothing back from the device and the
loader feeding a GPU can run ahead. The cost is that every op touches every sample: the random
jitter order runs as 6 fused affine passes around one hue pass (see :meth:`GpuAugment._jitter`),
grey and blur are computed for the whole batch and blended by mask.

On the CPU there is no device to stall, and touching every sample costs throughput instead: the
stage there applies each op to the samples that draw it (index gathers; ``selection="gather"``),
about 2.9× faster for 64 views of 224 px on 2 cores (528 → 181 ms; the FFCV loader's full recipe went
from 0.71× to 2.29× the torch loader in ``bench/ffcv_compare.py``, 2026-11-30, load ≈ 1.2). Both give the same result for the same
parameters (a test checks it); :attr:`GpuAugment.selection` picks one, by device unless set.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .augment import AugmentConfig

# ITU-R 601-2 luma weights, as torchvision's rgb_to_grayscale.
LUMA = (0.2989, 0.587, 0.114)


_LUMA_ON: dict[tuple[str, torch.dtype], torch.Tensor] = {}


def _grey(x: torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W)`` float → ``(N, 1, H, W)`` luma."""
    key = (str(x.device), x.dtype)
    if key not in _LUMA_ON:  # once per device: a blocking host→device copy each call would stall the CPU
        _LUMA_ON[key] = torch.tensor(LUMA, dtype=x.dtype, device=x.device)
    return torch.einsum("nchw,c->nhw", x, _LUMA_ON[key]).unsqueeze(1)


def _bcast(f: torch.Tensor) -> torch.Tensor:
    return f.view(-1, 1, 1, 1)


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``clamp(f·x, 0, 1)``; ``x`` ``(N, 3, H, W)`` float in [0, 1], ``f`` ``(N,)``. In place on ``x``."""
    return x.mul_(_bcast(f)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Blend with each image's mean luma: ``clamp(f·x + (1-f)·mean)``. In place on ``x``."""
    m = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
    f = _bcast(f)
    return x.mul_(f).add_((1 - f) * m).clamp_(0, 1)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Blend with the grey image: ``clamp(f·x + (1-f)·grey(x))``. In place on ``x``."""
    f = _bcast(f)
    grey = _grey(x).mul_(1 - f)
    return x.mul_(f).add_(grey).clamp_(0, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` ``(N,)`` (fraction of a turn, in [-0.5, 0.5]); ``x`` ``(N, 3, H, W)``
    float in [0, 1]. In place on ``x``.

    HSV as torchvision's ``adjust_hue`` (RGB → HSV, ``h = (h + shift) mod 1``, HSV → RGB), with
    the back conversion written without a per-pixel sector lookup: channel ``n`` (R: 5, G: 3,
    B: 1) is ``v - v·s·clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + 6h) mod 6`` and ``v·s`` the
    channel range. Temporaries are reused in place (CPU page faults on fresh buffers dominate).
    """
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    cr = maxc.sub(minc)  # = v·s
    r_max, g_max = maxc == r, maxc == g
    # torchvision's piecewise hue in sixths of a turn: R max → (g-b)/cr, G max → 2+(b-r)/cr, else
    # 4+(r-g)/cr; grey pixels (cr = 0) get 0 as there (the numerator is 0 too).
    num = torch.where(r_max, g - b, torch.where(g_max, b - r, r - g))
    k = torch.where(r_max, 0.0, torch.where(g_max, 2.0, 4.0))
    h6 = num.div_(minc.copy_(cr).clamp_min_(1e-12)).add_(k).add_(6.0 * shift.view(-1, 1, 1)).remainder_(6.0)
    t = minc  # reuse the buffers
    for c, n in enumerate((5.0, 3.0, 1.0)):
        torch.add(h6, n, out=k).remainder_(6.0)
        torch.neg(k, out=t).add_(4.0)
        torch.minimum(k, t, out=t).clamp_(0, 1).mul_(cr)
        x[:, c].copy_(maxc).sub_(t)
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """Separable Gaussian blur with one ``sigma`` (pixels) per image, ``kernel`` taps (odd), reflect padding.

    Args:
        x: ``(N, C, H, W)`` float.
        sigma: ``(N,)`` float, > 0.
    Returns:
        ``(N, C, H, W)``, same dtype.
    """
    n, c, h, w = x.shape
    half = (kernel - 1) / 2
    t = torch.linspace(-half, half, kernel, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t.view(1, -1) / sigma.to(x.dtype).view(-1, 1)) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (N*C, kernel)
    pad = kernel // 2
    mode = "reflect" if pad < min(h, w) else "replicate"
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode=mode), k.view(n * c, 1, 1, kernel), groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode=mode), k.view(n * c, 1, kernel, 1), groups=n * c)
    return y.view(n, c, h, w)


class GpuAugment:
    """The SimSiam colour stage for a batch, on the batch's device.

    Args:
        aug: recipe parameters (``jitter_p``, ``brightness``, ``contrast``, ``saturation``, ``hue``,
            ``grayscale_p``, ``blur_p``, ``blur_sigma``, ``blur_kernel``, ``flip_p``, ``mean``, ``std``).
        flip: also flip horizontally with ``aug.flip_p`` (off when the decoder already flips).
        normalize: subtract ``aug.mean`` and divide by ``aug.std`` at the end.
        selection: ``"masks"`` (every op on every sample, blended by mask: no host reads; used on
            CUDA), ``"gather"`` (each op on the samples that draw it, picked with ``nonzero``: less
            work, but a host read per op; used on the CPU, where reads cost nothing), or None: by
            the batch's device.

    Call with ``x``: ``(B, 3, H, W)`` uint8 (0–255) or float (0–1), any memory format, CPU or
    CUDA; returns ``(B, 3, H, W)`` float32 on the same device (normalised if asked). Pass a
    ``torch.Generator`` on ``x``'s device for reproducible draws.

    Raises:
        ValueError: ``x`` is not ``(B, 3, H, W)``.
    """

    def __init__(self, aug: AugmentConfig, flip: bool = False, normalize: bool = True, selection: str | None = None):
        if selection not in (None, "masks", "gather"):
            raise ValueError(f"selection must be 'masks', 'gather' or None, got {selection!r}")
        self.aug, self.flip, self.normalize, self.selection = aug, flip, normalize, selection
        self._stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def sample_params(self, n: int, device: torch.device | str = "cpu",
                      generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Draw every random parameter of ``n`` samples as tensors on ``device``.

        Returns a dict of ``(n,)`` tensors: ``jitter`` / ``grey`` / ``blur`` / ``flip`` (bool: the
        op is applied), ``brightness`` / ``contrast`` / ``saturation`` (factors), ``hue`` (turns),
        ``sigma`` (pixels), and ``order`` ``(n, 4)`` int64 (a permutation of the 4 jitter ops).
        """
        a = self.aug

        def u(lo: float, hi: float) -> torch.Tensor:
            return torch.rand(n, device=device, generator=generator) * (hi - lo) + lo

        return {
            "jitter": torch.rand(n, device=device, generator=generator) < a.jitter_p,
            "brightness": u(max(0.0, 1 - a.brightness), 1 + a.brightness),
            "contrast": u(max(0.0, 1 - a.contrast), 1 + a.contrast),
            "saturation": u(max(0.0, 1 - a.saturation), 1 + a.saturation),
            "hue": u(-a.hue, a.hue),
            "order": torch.rand(n, 4, device=device, generator=generator).argsort(1),
            "grey": torch.rand(n, device=device, generator=generator) < a.grayscale_p,
            "blur": torch.rand(n, device=device, generator=generator) < a.blur_p,
            "sigma": u(*a.blur_sigma),
            "flip": torch.rand(n, device=device, generator=generator) < (a.flip_p if self.flip else 0.0),
        }

    def apply(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """Augment ``x`` with parameters ``p`` from :meth:`sample_params` (see the class doc)."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) batch, got shape {tuple(x.shape)}")
        return self._apply(x, p)

    def _apply(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        x = x.contiguous()  # on uint8 (1 byte/pixel) before the float copy
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.to(torch.float32, copy=True)
        a = self.aug
        if (self.selection or ("masks" if x.device.type == "cuda" else "gather")) == "gather":
            return self._finish(self._gathered(x, p), p)
        if a.jitter_p > 0:
            x = self._jitter(x, p)
        if a.grayscale_p > 0:
            x = torch.where(_bcast(p["grey"]), _grey(x).expand(-1, 3, -1, -1), x)
        if a.blur_p > 0:
            x = torch.where(_bcast(p["blur"]), gaussian_blur(x, p["sigma"], a.blur_kernel), x)
        return self._finish(x, p)

    def _finish(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """Flip (by mask) and normalise: the same on both selections."""
        if self.flip:
            x = torch.where(_bcast(p["flip"]), x.flip(-1), x)
        if self.normalize:
            mean, std = self._statistics(x.device)
            x = x.sub_(mean).div_(std)
        return x

    def _gathered(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """Jitter (the four ops in each sample's order), grey and blur, each op on the samples that
        draw it (``selection="gather"``: reads the choices back with ``nonzero``)."""
        a = self.aug
        if a.jitter_p > 0:
            ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
            factors = (p["brightness"], p["contrast"], p["saturation"], p["hue"])
            for step in range(4):
                for j, op in enumerate(ops):
                    if j == 3 and a.hue == 0:
                        continue
                    idx = (p["jitter"] & (p["order"][:, step] == j)).nonzero().squeeze(1)
                    if idx.numel():
                        x[idx] = op(x[idx], factors[j][idx])
        if a.grayscale_p > 0:
            idx = p["grey"].nonzero().squeeze(1)
            if idx.numel():
                x[idx] = _grey(x[idx]).expand(-1, 3, -1, -1)
        if a.blur_p > 0:
            idx = p["blur"].nonzero().squeeze(1)
            if idx.numel():
                x[idx] = gaussian_blur(x[idx], p["sigma"][idx], a.blur_kernel)
        return x

    def _jitter(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """Colour jitter in each sample's own random order, without host reads.

        Brightness, contrast and saturation are all ``clamp(α·x + β·mean(grey) + γ·grey)`` (α = f;
        β = 1 - f for contrast, γ = 1 - f for saturation, else 0; identity: α = 1, β = γ = 0), so one
        fused pass applies whichever of the three a sample needs. Hue runs once, for every jittered
        sample, between passes 2 and 3: a sample whose hue comes ``k``-th in its order runs its
        ``k`` earlier ops in passes ``3-k … 2`` and the rest in passes ``3 … 5-k``, identity in the
        other passes. The arithmetic per sample is the same as applying the four ops one by one.
        """
        n = x.shape[0]
        order, jitter = p["order"], p["jitter"]
        slots = torch.arange(4, device=order.device).expand(n, 4)
        is_hue = order == 3
        k = is_hue.to(torch.uint8).argmax(1)  # position of hue in each sample's order
        # the three affine ops in the sample's order (hue removed): sort hue's slot last
        affine = order.gather(1, torch.where(is_hue, 4, slots).argsort(1)[:, :3])
        factors = torch.stack((p["brightness"], p["contrast"], p["saturation"]), 1)  # (n, 3)
        one, zero = torch.ones_like(factors[:, 0]), torch.zeros_like(factors[:, 0])
        for step in range(6):
            if step == 3 and self.aug.hue != 0:
                x = torch.where(_bcast(jitter), adjust_hue(x.clone(), p["hue"]), x)
            i = k.long() + (step - 3)  # index into `affine` of the op this pass applies
            on = jitter & (i >= 0) & (i < 3)
            op = affine.gather(1, i.clamp(0, 2).unsqueeze(1)).squeeze(1)
            f = factors.gather(1, op.unsqueeze(1)).squeeze(1)
            alpha = torch.where(on, f, one)
            beta = torch.where(on & (op == 1), 1 - f, zero)
            gamma = torch.where(on & (op == 2), 1 - f, zero)
            g = _grey(x)
            m = g.mean(dim=(1, 2, 3), keepdim=True)
            x = x.mul_(_bcast(alpha)).add_(g.mul_(_bcast(gamma)).add_(_bcast(beta) * m)).clamp_(0, 1)
        return x

    def _statistics(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``aug.mean`` / ``aug.std`` as ``(1, 3, 1, 1)`` float32 on ``device``, made once per device."""
        key = str(device)
        if key not in self._stats:
            self._stats[key] = (torch.tensor(self.aug.mean, device=device).view(1, 3, 1, 1),
                                torch.tensor(self.aug.std, device=device).view(1, 3, 1, 1))
        return self._stats[key]

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.apply(x, self.sample_params(x.shape[0], x.device, generator))
