"""Issue 8's GPU checks, run under ``torchrun``: SyncBatchNorm against BatchNorm2d, and DDP's cost.

    torchrun --nproc-per-node=1 bench/ddp_check.py --out ddp.json                 # NCCL on a GPU
    torchrun --nproc-per-node=1 bench/ddp_check.py --device cpu --rehearse ...    # gloo, toy sizes

1. **SyncBN = BN** for channels-last bf16 input (a past failure of exactly this combination:
   pytorch/pytorch#64039). A ``BatchNorm2d`` and a ``SyncBatchNorm`` with the same parameters
   normalise the same ``(N, C, H, W)`` channels_last bf16 batch in training mode; their outputs,
   input gradients, weight/bias gradients and running statistics must agree (relative error
   ``‖a - b‖ / ‖b‖`` below ``--tolerance``, default 1e-2, bf16's rounding). With one process,
   ``nn.SyncBatchNorm`` itself falls back to ``F.batch_norm`` (torch's ``need_sync`` is false at world
   size 1), so the check also calls the synchronising autograd function
   (``torch.nn.modules._functions.SyncBatchNorm``, what runs with 2+ GPUs: per-rank
   ``batch_norm_stats``, an all-gather over the process group, ``batch_norm_gather_stats_with_counts``,
   ``batch_norm_elemt``) directly. Its kernels are CUDA-only: on the CPU this part is skipped.
2. **DDP costs < 5%**: SimSiam training steps (forward, loss, backward, SGD) on synthetic views of a
   model wrapped in ``DistributedDataParallel`` (SyncBN-converted, as ``--sync-bn`` does) against the
   same model unwrapped with plain BN, timed alternately in one process (``--repeats`` windows of
   ``--steps`` steps each); the medians' ratio must be >= 0.95.

Writes ``--out`` (JSON: every figure, pass/fail per check) and prints one line per check. Exit
status 0 when every check that ran passed, 1 when one failed or raised (its message is recorded).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from model.distributed import destroy, init_from_env, wrap_ddp  # noqa: E402
from model.loss import SimSiamLoss  # noqa: E402
from model.norm import convert_sync_bn  # noqa: E402
from model.precision import Precision  # noqa: E402
from model.simsiam import SimSiam  # noqa: E402

DDP_MIN_RATIO = 0.95  # issue 8: DDP's images/s within 5% of the single-process run


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a - b‖ / ‖b‖`` in float64 (inf when ``a`` is not finite)."""
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30)).item()


def _bn_run(bn_forward, module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> dict:
    """Forward ``x`` through ``bn_forward`` (training mode), backward ``grad``; outputs and gradients."""
    x = x.detach().clone().requires_grad_(True)
    y = bn_forward(x)
    y.backward(grad)
    return {"output": y.detach(), "input_grad": x.grad.detach(), "weight_grad": module.weight.grad.detach(),
            "bias_grad": module.bias.grad.detach(), "running_mean": module.running_mean.detach().clone(),
            "running_var": module.running_var.detach().clone()}


def check_sync_bn(device: torch.device, n: int, c: int, hw: int, tolerance: float, seed: int = 0) -> dict:
    """Check 1 (see the module docstring) on a ``(n, c, hw, hw)`` channels_last bf16 batch."""
    if device.type != "cuda":
        return {"status": "skipped", "reason": "SyncBatchNorm's kernels (batch_norm_stats, ...) are CUDA-only"}
    g = torch.Generator(device=device).manual_seed(seed)
    x = (torch.randn(n, c, hw, hw, device=device, generator=g) * 3 + 1).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(n, c, hw, hw, device=device, generator=g).to(torch.bfloat16)
    grad = grad.contiguous(memory_format=torch.channels_last)
    ref = nn.BatchNorm2d(c).to(device)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(c)))[0].to(device)
    sync.load_state_dict(ref.state_dict())
    forced = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(c)))[0].to(device)
    forced.load_state_dict(ref.state_dict())
    from torch.nn.modules._functions import SyncBatchNorm as SyncBNFunction
    group = dist.group.WORLD

    def forced_forward(inp):  # the path nn.SyncBatchNorm takes when world size > 1
        return SyncBNFunction.apply(inp, forced.weight, forced.bias, forced.running_mean, forced.running_var,
                                    forced.eps, forced.momentum, group, dist.get_world_size(group))

    want = _bn_run(ref, ref, x, grad)
    result = {"shape": [n, c, hw, hw], "dtype": "bfloat16", "memory_format": "channels_last",
              "tolerance": tolerance, "status": "ok"}
    for name, fwd, mod in (("module", sync, sync), ("sync_function", forced_forward, forced)):
        got = _bn_run(fwd, mod, x, grad)
        errs = {k: rel_err(got[k], want[k]) for k in want}
        layout = got["output"].is_contiguous(memory_format=torch.channels_last)
        ok = all(e < tolerance for e in errs.values())
        result[name] = {"rel_err": errs, "output_channels_last": layout, "output_dtype": str(got["output"].dtype),
                        "passed": ok}
        if not ok:
            result["status"] = "failed"
    return result


def _step(model, criterion, opt, precision, v1, v2) -> None:
    opt.zero_grad(set_to_none=True)
    with precision.autocast():
        loss = criterion(*model(v1, v2))
    loss.backward()
    opt.step()


def _window(model, criterion, opt, precision, v1, v2, steps: int, sync) -> float:
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        _step(model, criterion, opt, precision, v1, v2)
    sync()
    return time.perf_counter() - t0


def check_ddp_speed(ctx, args) -> dict:
    """Check 2 (see the module docstring): images/s of DDP(SyncBN model) vs the plain model."""
    device = ctx.device
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(args.seed)
    plain = SimSiam(args.arch, args.dim, args.pred_dim, args.small_stem).to(device, memory_format=fmt).train()
    converted = SimSiam(args.arch, args.dim, args.pred_dim, args.small_stem)
    converted.load_state_dict(plain.state_dict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted, kind = convert_sync_bn(converted, device)
    ddp = wrap_ddp(converted.to(device, memory_format=fmt).train(), ctx)
    precision = Precision(args.amp, device)
    criterion = SimSiamLoss()
    opts = {name: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
            for name, m in (("single", plain), ("ddp", ddp))}
    models = {"single": plain, "ddp": ddp}
    g = torch.Generator(device=device).manual_seed(args.seed)
    views = [torch.randn(args.batch, 3, args.image_size, args.image_size, device=device, generator=g)
             .contiguous(memory_format=fmt) for _ in range(2)]
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for name in models:  # warm-up: cuDNN algorithm choice, DDP's first-iteration bucket rebuild
        for _ in range(args.warmup):
            _step(models[name], criterion, opts[name], precision, *views)
    times = {name: [] for name in models}
    for _ in range(args.repeats):  # alternate, so drifting clocks or load affect both alike
        for name in models:
            times[name].append(_window(models[name], criterion, opts[name], precision, *views, args.steps, sync))
    ips = {name: [args.batch * args.steps / t for t in ts] for name, ts in times.items()}
    med = {name: statistics.median(v) for name, v in ips.items()}
    ratio = med["ddp"] / med["single"]
    return {"status": "ok" if ratio >= DDP_MIN_RATIO else "failed", "ratio": ratio, "min_ratio": DDP_MIN_RATIO,
            "images_per_s": med, "images_per_s_runs": ips, "sync_bn_kind": kind,
            "sync_bn_warnings": [str(w.message) for w in caught], "world_size": ctx.world_size,
            "backend": ctx.backend, "batch": args.batch, "steps": args.steps, "repeats": args.repeats,
            "arch": args.arch, "image_size": args.image_size, "amp": args.amp, "channels_last": args.channels_last}


def _guarded(check, *args) -> dict:
    """Run a check; an exception inside it (e.g. a kernel that refuses bf16 channels_last input) is
    its finding: status ``error`` with the message and traceback, and the other check still runs."""
    try:
        return check(*args)
    except Exception as exc:  # noqa: BLE001 - recorded, printed, and the exit status says so
        import traceback
        traceback.print_exc()
        return {"status": "error", "error": f"{type(exc).__name__}: {exc}"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="JSON file for every figure")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu (cpu: gloo, check 1 skipped)")
    p.add_argument("-a", "--arch", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--small-stem", action="store_true")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--pred-dim", type=int, default=512)
    p.add_argument("--amp", default="bf16", choices=("off", "bf16", "fp16"))
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("-b", "--batch", type=int, default=256, help="images per step")
    p.add_argument("--steps", type=int, default=10, help="steps per timed window")
    p.add_argument("--repeats", type=int, default=3, help="timed windows per model, alternating")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--bn-shape", default="32,64,56", help="N,C,HW of the SyncBN check's batch")
    p.add_argument("--tolerance", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    ctx = init_from_env(args.device)
    result = {"torch": torch.__version__, "device": str(ctx.device), "backend": ctx.backend,
              "world_size": ctx.world_size}
    try:
        if not ctx.distributed:
            print("ddp_check: not started by torchrun (no process group); run: torchrun --nproc-per-node=1 "
                  "bench/ddp_check.py ...", file=sys.stderr)
            return 2
        n, c, hw = (int(v) for v in args.bn_shape.split(","))
        result["sync_bn_vs_bn"] = _guarded(check_sync_bn, ctx.device, n, c, hw, args.tolerance, args.seed)
        result["ddp_speed"] = _guarded(check_ddp_speed, ctx, args)
    finally:
        if ctx.is_main:
            Path(args.out).write_text(json.dumps(result, indent=1, default=str))
        destroy(ctx)
    bn, speed = result["sync_bn_vs_bn"], result["ddp_speed"]
    if ctx.is_main:
        if bn["status"] == "skipped":
            print(f"SyncBN vs BN: skipped ({bn['reason']})")
        elif bn["status"] == "error":
            print(f"SyncBN vs BN: error ({bn['error']})")
        else:
            worst = max(max(bn[k]["rel_err"].values()) for k in ("module", "sync_function"))
            print(f"SyncBN vs BN (channels_last bf16 {bn['shape']}): {bn['status']}, largest relative error "
                  f"{worst:.2e} (tolerance {bn['tolerance']})")
        if speed["status"] == "error":
            print(f"DDP vs single process: error ({speed['error']})")
        else:
            print(f"DDP vs single process ({speed['backend']}, world size {speed['world_size']}, SyncBN: "
                  f"{speed['sync_bn_kind']}): {speed['images_per_s']['ddp']:.1f} vs "
                  f"{speed['images_per_s']['single']:.1f} images/s = {speed['ratio']:.3f} (>= {DDP_MIN_RATIO} to "
                  f"pass): {speed['status']}")
    return 0 if all(r["status"] in ("ok", "skipped") for r in (bn, speed)) else 1


if __name__ == "__main__":
    sys.exit(main())
