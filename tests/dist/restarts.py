"""Run under ``torchrun --nproc-per-node=2 --max-restarts=3``: rank 1 is killed in attempts 0-2.

In every restarted attempt one new worker starts 2 s after the other (rank 1 in attempts 1 and 3,
rank 0 in attempt 2), so the early one reaches the store first: with keys shared between attempts it
would read its peer's address from the dead attempt (see ``model.distributed.attempt_store``).
Each attempt all-reduces attempt + 1 over the 2 ranks; rank 0 appends ``attempt sum`` to argv[1].
"""
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's modules, not an installed copy's

from model.distributed import destroy, init_from_env


def main():
    rank, attempt = int(os.environ["RANK"]), int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    if attempt > 0 and rank == attempt % 2:
        time.sleep(2)
    ctx = init_from_env("cpu", timeout_min=0.5)
    total = torch.tensor([attempt + 1.0])
    dist.all_reduce(total)
    if rank == 0:
        with open(sys.argv[1], "a") as f:
            f.write(f"{attempt} {total.item():g}\n")
    dist.barrier()
    if rank == 1 and attempt < 3:
        os.kill(os.getpid(), signal.SIGKILL)
    destroy(ctx)


if __name__ == "__main__":
    main()
