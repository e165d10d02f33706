"""Representation quality on the frozen backbone: weighted kNN and a linear probe.

kNN monitor: Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance
Discrimination" (InstDisc), CVPR 2018, §3.4: ℓ2-normalised features, the ``k`` = 200 most
cosine-similar bank samples vote for their class with weight ``exp(sim / τ)``, τ = 0.1.
Linear probe: multinomial logistic regression on the frozen, standardised features, fitted with
L-BFGS (a small, fast stand-in for the paper's linear classification protocol, §4 / appendix).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def extract_features(backbone: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                     autocast=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the backbone in eval mode over ``(images (B,3,H,W) float, labels (B,) int64)`` batches.

    Returns:
        ``(features (N, D) float32 on the CPU, not normalised, labels (N,) int64)``. The backbone's
        train/eval mode is restored afterwards.
    """
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    try:
        for images, y in batches:
            with autocast() if autocast is not None else torch.autocast(images.device.type, enabled=False):
                f = backbone(images)
            feats.append(f.float().cpu())
            labels.append(y.cpu())
    finally:
        backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_top1(bank: torch.Tensor, bank_labels: torch.Tensor, query: torch.Tensor, query_labels: torch.Tensor,
             k: int = 200, temperature: float = 0.1, chunk: int = 1024) -> float:
    """Weighted kNN top-1 accuracy in percent (InstDisc §3.4; k = 200, τ = 0.1 by default).

    Args:
        bank: ``(N, D)`` features of the labelled bank; ``bank_labels`` ``(N,)`` int64.
        query: ``(M, D)`` features to classify; ``query_labels`` ``(M,)`` int64.

    Raises:
        ValueError: empty bank or query, or mismatched feature widths.
    """
    if len(bank) == 0 or len(query) == 0:
        raise ValueError("kNN needs a non-empty bank and query set")
    if bank.shape[1] != query.shape[1]:
        raise ValueError(f"feature widths differ: bank {bank.shape[1]}, query {query.shape[1]}")
    k = min(k, len(bank))
    num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    bank = F.normalize(bank.float(), dim=1)
    correct = 0
    for i in range(0, len(query), chunk):
        q = F.normalize(query[i:i + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        weight = (sim / temperature).exp()
        votes = torch.zeros(len(q), num_classes).scatter_add_(1, bank_labels[idx], weight)
        correct += (votes.argmax(dim=1) == query_labels[i:i + chunk]).sum().item()
    return 100.0 * correct / len(query)


def linear_probe_top1(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor,
                      test_labels: torch.Tensor, weight_decay: float = 1e-4, max_iter: int = 200) -> float:
    """Top-1 (percent) of a logistic-regression probe fitted with L-BFGS on frozen features.

    Features are standardised with the training features' mean and std. Deterministic on the CPU.

    Args:
        train: ``(N, D)`` float features, ``train_labels`` ``(N,)`` int64; ``test`` likewise.
    """
    mean, std = train.mean(0), train.std(0) + 1e-6
    x, xt = (train - mean) / std, (test - mean) / std
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    head = nn.Linear(x.shape[1], num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(x), train_labels) + weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return 100.0 * (head(xt).argmax(1) == test_labels).float().mean().item()


@torch.no_grad()
def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """How many rows have their label among the ``k`` highest logits, for each ``k`` in ``ks``.

    Args:
        logits: ``(B, C)`` float scores; ``labels``: ``(B,)`` int64 class indices.
        ks: the ``k`` values; a ``k`` larger than ``C`` counts every row (as top-C).

    Returns:
        ``(len(ks),)`` float32 counts on ``logits``' device (no host read: sum them across batches
        and read once).
    """
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == labels.view(-1, 1)
    return torch.stack([hit[:, :k].any(dim=1).sum() for k in ks]).float()
