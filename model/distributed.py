"""Many processes in one place: torchrun's environment, the process group, DDP and collectives.

``torchrun`` (``torch.distributed.run``, PyTorch's elastic agent) starts one process per GPU and
sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` /
``MASTER_PORT`` and ``TORCHELASTIC_RESTART_COUNT`` in each (torch docs, "torchrun (Elastic
Launch)", environment variables). :func:`init_from_env` reads them, initialises the process group
(NCCL on CUDA, gloo on the CPU; torch docs, "Which backend to use?") and picks ``cuda:LOCAL_RANK``.
A plain ``python train.py`` has none of these variables: world size 1, no process group, and every
helper here is a no-op, so single-process behaviour is unchanged.

Order of set-up (``shared/DESIGN.md``): process group → device from ``LOCAL_RANK`` → model →
SyncBN conversion → ``.to(device, channels_last)`` → :func:`wrap_ddp` → optimiser.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from pipeline.device import resolve_device

TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands among its peers.

    Attributes:
        rank: global rank in ``[0, world_size)``; rank 0 alone prints and writes files.
        local_rank: rank on this node; selects ``cuda:local_rank`` and runs per-node work (the scan).
        world_size: number of processes (1 without torchrun).
        local_world_size: processes on this node.
        device: this process's training device.
        backend: ``"nccl"``, ``"gloo"`` or None when no process group was started.
        restart: ``TORCHELASTIC_RESTART_COUNT`` (0 on the first attempt).
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    restart: int = 0

    @property
    def is_main(self) -> bool:
        """True on global rank 0: the process that prints, logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group is initialised (torchrun, even with one process)."""
        return self.backend is not None

    def barrier(self) -> None:
        """Wait for every rank (no-op without a process group)."""
        if self.distributed:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    @contextlib.contextmanager
    def local_main_first(self):
        """Run the block on local rank 0 first, then on the node's other ranks.

        For per-node work whose result the others read from disk: the image-folder scan and its
        cache, data preparation, an FFCV ``.beton`` write. Without a process group it just runs.
        """
        first = self.local_rank == 0
        if not first:
            self.barrier()
        yield
        if first:
            self.barrier()

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``(n_r, ...)`` tensor along dim 0, in rank order, on every rank.

        Ranks may hold different row counts (padded for the collective, trimmed after). The result
        is on ``x``'s device. Without a process group, ``x`` itself.
        """
        if not self.distributed:
            return x
        comm = x.to(self.device)
        n = torch.tensor([comm.shape[0]], device=self.device)
        counts = [torch.zeros_like(n) for _ in range(self.world_size)]
        dist.all_gather(counts, n)
        counts = [int(c) for c in torch.cat(counts).tolist()]
        pad = max(counts)
        padded = torch.zeros((pad, *comm.shape[1:]), dtype=comm.dtype, device=self.device)
        padded[:comm.shape[0]] = comm
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(x.device)

    def shard_range(self, n: int) -> tuple[int, int]:
        """This rank's contiguous slice ``[start, stop)`` of ``n`` items (sizes differ by at most 1),
        so that :meth:`gather_rows` of per-slice results restores the original order."""
        return n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size

    def all_reduce(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place all-reduce of ``x`` (``sum``, ``max`` or ``avg``); returns ``x``. No-op alone."""
        if self.distributed:
            if op == "avg":
                dist.all_reduce(x, op=dist.ReduceOp.SUM)
                x.div_(self.world_size)
            else:
                dist.all_reduce(x, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return x

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank (pickled; for small host-side values)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher following its convention) set RANK, LOCAL_RANK and WORLD_SIZE."""
    return all(v in os.environ for v in TORCHRUN_VARS)


def attempt_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The key-value store for this attempt's process group: torch's own ``env://`` rendezvous, with
    its keys under ``attempt<TORCHELASTIC_RESTART_COUNT>/`` when the store is the elastic agent's.

    Since torch 2.5 the c10d rendezvous shares the agent's TCPStore with the workers
    (``TORCHELASTIC_USE_AGENT_STORE=True``), and that store outlives a restart. The backends write
    their peers' addresses under the same key names in every attempt, so after a restart a fast rank
    can read a dead peer's address: gloo then fails with "connectFullMesh failed ... Connection
    refused", NCCL with a stale unique id (pytorch/pytorch#135712, #167288). Seen here in CI with
    2 gloo ranks and ``--max-restarts=1``, and in 4 of 6 runs of a 2-rank restart where one new
    worker starts 3 s late (torch 2.14.1). A per-attempt prefix gives each attempt fresh keys.
    The restart count is each node's own, so across nodes the README advises
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: without the agent's store rank 0 hosts a new store on a
    new port each attempt and no prefix is needed.

    Args:
        rank, world_size: this process's global rank and the world size (from torchrun's environment).
        timeout: how long to wait for the store and the peers.

    Returns:
        a ``torch.distributed.Store`` (a ``PrefixStore`` over the agent's store, or torch's own).

    Raises:
        ValueError: ``MASTER_ADDR`` / ``MASTER_PORT`` are missing (torch's rendezvous error).
    """
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=timeout))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True):
        store = dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)
    return store


def init_from_env(device: str = "auto", timeout_min: float = 30.0) -> DistContext:
    """Read torchrun's environment, start the process group and choose this rank's device.

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``. Under torchrun, ``auto``/``cuda`` become
            ``cuda:LOCAL_RANK`` when GPUs are visible; ``cpu`` keeps every rank on the CPU (gloo).
        timeout_min: collective time-out in minutes (torch's default is 30 for gloo; NCCL's 10).

    Returns:
        a :class:`DistContext`; world size 1 and no process group without torchrun.

    Raises:
        ValueError: a CUDA device was asked for and none is visible, or fewer GPUs than local ranks.
    """
    if not launched_by_torchrun():
        return DistContext(device=resolve_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    dev = resolve_device(device)
    if dev.type == "cuda":
        if dev.index is None:
            if local_world > torch.cuda.device_count():  # every local rank says so, not just the last ones
                raise ValueError(f"{local_world} processes on this node need a GPU each, but only "
                                 f"{torch.cuda.device_count()} GPU(s) are visible: start at most that many "
                                 f"processes per node")
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_min)
        dist.init_process_group(backend, store=attempt_store(rank, world_size, timeout), rank=rank,
                                world_size=world_size, timeout=timeout,
                                device_id=dev if dev.type == "cuda" else None)
    return DistContext(rank=rank, local_rank=local_rank, world_size=world_size, local_world_size=local_world,
                       device=dev, backend=backend, restart=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)))


def destroy(ctx: DistContext) -> None:
    """Destroy the process group if one was started (safe to call twice, and after an error)."""
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    """``DistributedDataParallel(model)`` under a process group; ``model`` itself otherwise.

    Gradients are averaged over ranks in buckets during backward (torch docs, DDP design notes);
    BN buffers are broadcast from rank 0 at each forward (``broadcast_buffers=True``, the default).
    ``gradient_as_bucket_view`` saves one gradient-sized copy. The caller keeps ``model`` (the
    unwrapped module) for checkpoints, so saved keys carry no ``module.`` prefix.
    """
    if not ctx.distributed:
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)


def no_sync(model: nn.Module, skip: bool):
    """``model.no_sync()`` when ``skip`` and ``model`` is DDP (gradient accumulation's first
    micro-batches: gradients accumulate locally, one all-reduce on the last); else a no-op."""
    model = getattr(model, "_orig_mod", model)  # torch.compile(ddp) wraps the DDP module
    if skip and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


class HostVote:
    """Host-side values every rank agrees on at every step, one step late, without a device sync.

    A stop signal reaches the ranks at different moments, and a clock says "a checkpoint is due"
    at different steps on different ranks; the ranks must nevertheless stop, and read back and
    save, at the same step, or their collectives no longer match. Every rank calls :meth:`poll`
    once per step with its own values; the call returns the maximum over ranks of the values every
    rank passed at its *previous* call. The exchange is an asynchronous all-reduce of a few CPU
    numbers on a gloo group of its own (started at step k, waited for at step k+1, so it overlaps
    the step and never waits for the GPU). Without a process group :meth:`poll` returns its
    arguments at once.

    Args:
        ctx: the :class:`DistContext`; under a process group every rank must construct it at the
            same point (it creates a group, a collective call).
    """

    def __init__(self, ctx: DistContext):
        self.ctx = ctx
        self._group = dist.new_group(backend="gloo") if ctx.distributed else None
        self._work = None
        self._values: torch.Tensor | None = None

    def _collect(self) -> tuple[float, ...] | None:
        if self._work is None:
            return None
        self._work.wait()
        self._work = None
        return tuple(self._values.tolist())

    def poll(self, *values: float) -> tuple[float, ...]:
        """Contribute this rank's ``values`` (floats; flags as 0/1); get the agreed previous ones.

        Returns:
            the maximum over ranks of the previous call's values (zeros on the first call); without
            a process group, ``values`` itself.
        """
        if not self.ctx.distributed:
            return tuple(float(v) for v in values)
        agreed = self._collect() or (0.0,) * len(values)
        self._values = torch.tensor([float(v) for v in values], dtype=torch.float64)
        self._work = dist.all_reduce(self._values, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        return agreed

    def now(self, *values: float) -> tuple[float, ...]:
        """The maximum over ranks of ``values`` at once (a blocking exchange: every rank must call
        it at the same point, e.g. an epoch boundary). A pending :meth:`poll` is completed first
        and its result dropped."""
        if not self.ctx.distributed:
            return tuple(float(v) for v in values)
        self._collect()
        x = torch.tensor([float(v) for v in values], dtype=torch.float64)
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self._group)
        return tuple(x.tolist())

    def close(self) -> None:
        """Complete a pending exchange (before the process group is destroyed)."""
        if self.ctx.distributed:
            self._collect()
