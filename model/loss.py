"""SimSiam loss, its ablations, and the collapse metric.

Source: Chen & He, CVPR 2021. Eq. (1)-(2): ``D(p, z) = -<p/||p||, z/||z||>``,
``L = D(p1, sg(z2))/2 + D(p2, sg(z1))/2`` with ``sg`` the stop-gradient. §4.5 (Tab. 4): a cross-entropy
similarity ``D(p, z) = -softmax(z) · log softmax(p)``. §4.6 (Tab. 5, "asym."): only ``D(p1, sg(z2))``.
§4.1 / Fig. 2: the std of the ℓ2-normalised output per channel, averaged over channels, is about
``1/sqrt(dim)`` when healthy and goes to 0 when the output collapses.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SIMILARITIES = ("cosine", "cross-entropy")


def _neg_similarity(p: torch.Tensor, z: torch.Tensor, similarity: str) -> torch.Tensor:
    if similarity == "cosine":
        return -F.cosine_similarity(p, z, dim=1).mean()
    return -(F.softmax(z, dim=1) * F.log_softmax(p, dim=1)).sum(dim=1).mean()


class SimSiamLoss(nn.Module):
    """Symmetric negative similarity with stop-gradient, always computed in float32.

    Args:
        stop_gradient: detach ``z`` (the paper's method); ``False`` is the collapse ablation.
        similarity: ``cosine`` (default, range [-1, 1]) or ``cross-entropy`` (§4.5).
        symmetric: average both directions (default) or use only ``D(p1, z2)``.

    Call with ``p1, p2, z1, z2`` of shape ``(B, dim)``, any float dtype (autocast outputs are cast
    to float32 first); returns a scalar float32 tensor.

    Raises:
        ValueError: unknown ``similarity``.
    """

    def __init__(self, stop_gradient: bool = True, similarity: str = "cosine", symmetric: bool = True):
        super().__init__()
        if similarity not in SIMILARITIES:
            raise ValueError(f"unknown similarity {similarity!r}; choose one of {', '.join(SIMILARITIES)}")
        self.stop_gradient, self.similarity, self.symmetric = stop_gradient, similarity, symmetric

    def forward(self, p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=p1.device.type, enabled=False):
            p1, p2, z1, z2 = (t.float() for t in (p1, p2, z1, z2))
            if self.stop_gradient:
                z1, z2 = z1.detach(), z2.detach()
            if not self.symmetric:
                return _neg_similarity(p1, z2, self.similarity)
            return 0.5 * (_neg_similarity(p1, z2, self.similarity) + _neg_similarity(p2, z1, self.similarity))


@torch.no_grad()
def z_std(z: torch.Tensor) -> torch.Tensor:
    """Collapse metric: mean over channels of the batch std of ``z / ||z||``.

    Args:
        z: ``(B, dim)`` projections, ``B >= 2``.

    Returns:
        scalar float32 tensor; about ``1/sqrt(dim)`` for a healthy output, 0 for a collapsed one.
    """
    return F.normalize(z.float(), dim=1).std(dim=0).mean()


def collapse_threshold(dim: int) -> float:
    """z-std below which training counts as collapsing: a tenth of ``1/sqrt(dim)``."""
    return 0.1 / math.sqrt(dim)
