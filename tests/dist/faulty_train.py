"""``train.py`` with one injected fault, for the elastic-restart and interruption tests.

Environment: FAULT_STEP (global step after which the fault fires), FAULT_RANK (default 0),
FAULT_SIGNAL (``KILL``: the process dies at once, as when a node is lost; ``TERM``: a polite stop
request, as a scheduler sends), FAULT_TARGET (who gets the signal: ``self``, the default;
``group``: this process's whole process group, DataLoader workers included, sent from another
process as ``kill -TERM -PGID`` or Slurm send it; ``parent``: the parent process, i.e. torchrun's
agent, which then signals every rank's process group). The fault fires only on the first attempt (TORCHELASTIC_RESTART_COUNT 0 or
unset), so a restarted run completes. Then runs ``train.cli()``; with EXIT_CODE_DIR set, each rank
writes its exit status to ``EXIT_CODE_DIR/rank<RANK>`` (torchrun reports its own status, not theirs).
"""
import os
import signal
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's modules, not an installed copy's

import train

_step = train.train_step
_fired = False


def faulty_step(*args, **kwargs):
    global _fired
    stats = _step(*args, **kwargs)
    faulty_step.calls += 1
    rank = int(os.environ.get("RANK", 0))
    first_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) == 0
    if (not _fired and first_attempt and rank == int(os.environ.get("FAULT_RANK", 0))
            and faulty_step.calls == int(os.environ["FAULT_STEP"])):
        _fired = True
        signum = getattr(signal, "SIG" + os.environ.get("FAULT_SIGNAL", "KILL"))
        target = os.environ.get("FAULT_TARGET", "self")
        if target == "group":  # sent by another process, as a scheduler's or a shell's signal is
            subprocess.run([sys.executable, "-c", f"import os; os.killpg({os.getpgrp()}, {int(signum)})"])
        elif target == "parent":
            os.kill(os.getppid(), signum)
        else:
            os.kill(os.getpid(), signum)
    return stats


faulty_step.calls = 0
train.train_step = faulty_step

if __name__ == "__main__":
    code = train.cli()
    if os.environ.get("EXIT_CODE_DIR"):
        Path(os.environ["EXIT_CODE_DIR"], f"rank{os.environ.get('RANK', 0)}").write_text(str(code))
    sys.exit(code)
