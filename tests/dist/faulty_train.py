"""``train.py`` with one injected fault, for the elastic-restart and interruption tests.

Environment: FAULT_STEP (global step after which the fault fires), FAULT_RANK (default 0),
FAULT_SIGNAL (``KILL``: the process dies at once, as when a node is lost; ``TERM``: a polite stop
request, as a scheduler sends). The fault fires only on the first attempt
(TORCHELASTIC_RESTART_COUNT 0 or unset), so a restarted run completes. Then runs ``train.cli()``.
"""
import os
import signal
import sys

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
        os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("FAULT_SIGNAL", "KILL")))
    return stats


faulty_step.calls = 0
train.train_step = faulty_step

if __name__ == "__main__":
    sys.exit(train.cli())
