"""Freed activation memory stays in the process: no page faults per step after the first."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_steps_buffers_are_not_faulted_in_again_once_memory_is_kept():
    res = subprocess.run([sys.executable, "-m", "model.host_memory"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True)
    before, after = (int(line.rsplit(":", 1)[1]) for line in res.stdout.splitlines())
    assert before > 10_000  # glibc's defaults return ~190 MiB to the kernel every round, faulted in again
    assert after < 100 and "kept: True" in res.stdout
