"""One SimSiam optimisation step, shared by ``train.py`` and ``bench/throughput.py``.

The step pulls ``accum`` micro-batches from an iterator, runs forward, loss and backward on each
(``loss / accum``; under DDP, ``no_sync`` on all but the last, so gradients are all-reduced once),
then makes one optimiser step through the :class:`~model.precision.Precision` GradScaler, which
skips a step whose gradients are not finite without a host read. Nothing here reads a value back
to the host: the returned :class:`StepStats` are device tensors that the caller reads every N
steps (``train.py --log-every``), so the CPU can run ahead of the GPU.

Profiler ranges (``torch.profiler.record_function``): ``data`` (waiting for the next batch),
``forward``, ``loss``, ``backward``, ``optimizer``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch.profiler import record_function

from .distributed import no_sync
from .loss import SimSiamLoss, z_std
from .precision import Precision


@dataclass
class StepStats:
    """What one step measured, as 0-d float32 tensors on the training device (not read back).

    Attributes:
        loss: mean loss over the micro-batches (the loss itself, not divided by ``accum``).
        z_std: collapse metric of view 1's projections (:func:`model.loss.z_std`), mean over
            micro-batches.
        nonfinite: 1.0 when some micro-batch's loss was NaN/inf (the update was skipped), else 0.0.
        images: images (view pairs) this rank consumed, a Python int (known without a device read).
    """

    loss: torch.Tensor
    z_std: torch.Tensor
    nonfinite: torch.Tensor
    images: int

    def packed(self) -> torch.Tensor:
        """``(3,)`` float32 tensor ``[loss, z_std, nonfinite]`` for batched read-back."""
        return torch.stack([self.loss, self.z_std, self.nonfinite])


def train_step(model: torch.nn.Module, criterion: SimSiamLoss, batches: Iterator, optimizer: torch.optim.Optimizer,
               precision: Precision, accum: int = 1) -> StepStats:
    """One optimiser step over ``accum`` micro-batches taken from ``batches``.

    Args:
        model: SimSiam, possibly wrapped in DDP and/or ``torch.compile``; called as
            ``model(view1, view2)`` → :class:`model.simsiam.SimSiamOutput`.
        batches: iterator of :class:`pipeline.TwoViewBatch` (views ``(B, 3, H, W)`` float on the
            model's device).
        optimizer: stepped through ``precision.scaler`` (fused SGD: no host read for the skip check).
        accum: micro-batches per step (gradient accumulation); BatchNorm sees each micro-batch on
            its own (across ranks with SyncBN), which is not the same as one batch of ``accum × B``.

    Returns:
        :class:`StepStats` (device tensors).

    Raises:
        StopIteration: ``batches`` ran out before ``accum`` micro-batches were read.
    """
    optimizer.zero_grad(set_to_none=True)
    scaler = precision.scaler
    losses, stds, images = [], [], 0
    for i in range(accum):
        with record_function("data"):
            batch = next(batches)
        with no_sync(model, i < accum - 1):
            with precision.autocast():
                with record_function("forward"):
                    out = model(batch.view1, batch.view2)
                with record_function("loss"):
                    loss = criterion(*out)
            with record_function("backward"):
                scaler.scale(loss / accum if accum > 1 else loss).backward()
        losses.append(loss.detach())
        stds.append(z_std(out.z1))
        images += batch.view1.shape[0]
    with record_function("optimizer"):
        scaler.step(optimizer)
        precision.update()
    loss = losses[0] if accum == 1 else torch.stack(losses).mean()
    nonfinite = (~torch.isfinite(torch.stack(losses)).all()).float()
    return StepStats(loss.float(), (stds[0] if accum == 1 else torch.stack(stds).mean()).float(), nonfinite, images)


class StatsReadback:
    """:class:`StepStats` kept on the device between read-backs, then read with one host sync.

    Under a process group the values are summed over ranks in the same collective (loss and z-std
    are then averaged over ranks; a step counts as non-finite when any rank's was), together with
    host-side flags the ranks must agree on (e.g. "a stop signal arrived"): every rank calls
    :meth:`read` at the same steps, so every rank gets the same answer.

    Args:
        ctx: a :class:`model.distributed.DistContext`.
    """

    def __init__(self, ctx):
        self.ctx = ctx
        self.steps: list[int] = []
        self._packed: list[torch.Tensor] = []

    def add(self, step: int, stats: StepStats) -> None:
        """Keep ``stats`` of global step ``step`` (no device read)."""
        self.steps.append(step)
        self._packed.append(stats.packed())

    def __len__(self) -> int:
        return len(self.steps)

    def read(self, flags: tuple[bool, ...] = ()) -> tuple[list[tuple[int, float, float, bool]], list[bool]]:
        """Read the kept steps back (one device sync; one all-reduce under DDP) and clear them.

        Returns:
            ``(rows, agreed)``: ``rows`` = ``[(step, loss, z_std, nonfinite), ...]`` in step order;
            ``agreed[i]`` is True when ``flags[i]`` was True on any rank.
        """
        device = self.ctx.device
        parts = [torch.stack(self._packed).flatten()] if self._packed else []
        parts.append(torch.tensor([float(f) for f in flags], device=device))
        payload = self.ctx.all_reduce(torch.cat([p.to(device, torch.float32) for p in parts]), "sum")
        values = payload.tolist()  # the one host read
        n, w = len(self.steps), self.ctx.world_size
        rows = [(s, values[3 * i] / w, values[3 * i + 1] / w, values[3 * i + 2] > 0) for i, s in enumerate(self.steps)]
        agreed = [v > 0 for v in values[3 * n:]]
        self.steps, self._packed = [], []
        return rows, agreed
