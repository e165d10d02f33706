"""Skip and count: what the shard backends that decode in Python (``torch``, ``torchvision-gpu``) do
with bad samples, in one place, so both count, log and stop alike.

A :class:`~pipeline.sources.tar_samples.BadSample` (no image or ``.cls``, bytes that do not decode,
a shard cut short) is left out of the batch and replaced by the reader's next sample; the
:class:`BadSampleLog` adds it to this rank's count for the epoch, appends one ``shard \\t key \\t
reason`` line to ``skip_log``, and stops the run with :class:`~pipeline.sources.tar_samples.BadShardData`
(one line) once more than ``max_bad_fraction`` of the rank's epoch was bad.

DALI cannot skip: a sample that fails in its pipeline ends the pipeline (NVIDIA/DALI#3913), so
``--loader dali`` stops on the first one (:mod:`pipeline.backends.dali.shards`).
"""
from __future__ import annotations

from pathlib import Path

from ..sources.tar_samples import BadSample, BadShardData


class BadSampleLog:
    """This rank's bad samples in the current epoch.

    Args:
        max_bad_fraction: stop once more than this share of ``num_samples`` was bad, in [0, 1].
        skip_log: file the bad samples are appended to; None: not written.
        num_samples: samples this rank reads per epoch (the fraction's denominator).
        rank: this rank (for the message).

    Attributes:
        count: bad samples met in the current epoch (the sum of their ``count``).

    Raises:
        ValueError: ``max_bad_fraction`` outside [0, 1].
    """

    def __init__(self, max_bad_fraction: float, skip_log: str | Path | None, num_samples: int, rank: int):
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be a share in [0, 1], got {max_bad_fraction}")
        self.max_bad_fraction, self.skip_log, self.num_samples, self.rank = max_bad_fraction, skip_log, num_samples, rank
        self.count, self.epoch = 0, 0

    def new_epoch(self, epoch: int) -> None:
        """Start counting epoch ``epoch`` from zero."""
        self.count, self.epoch = 0, epoch

    def note(self, bad: list[BadSample]) -> None:
        """Count ``bad`` and append them to ``skip_log``.

        Raises:
            BadShardData: the epoch's count now exceeds ``max_bad_fraction × num_samples`` (one
                line: the count, the first sample of ``bad`` and why, where the list is).
        """
        if not bad:
            return
        self.count += sum(b.count for b in bad)
        if self.skip_log is not None:
            Path(self.skip_log).parent.mkdir(parents=True, exist_ok=True)  # the run's folder may not exist yet
            with open(self.skip_log, "a") as f:
                f.write("".join(b.line() + "\n" for b in bad))
        if self.count > self.max_bad_fraction * self.num_samples:
            first = bad[0]
            raise BadShardData(
                f"{self.count} bad sample(s) in epoch {self.epoch + 1} on rank {self.rank}, more than --max-bad-fraction "
                f"{self.max_bad_fraction:g} of its {self.num_samples}; e.g. {first.url} key {first.key or '-'}: "
                f"{first.reason}" + (f"; all listed in {self.skip_log}" if self.skip_log else "")
                + "; rewrite the shards (python -m pipeline.shards write) or raise --max-bad-fraction")


def one_line(exc: BadShardData) -> BadShardData:
    """``exc`` as one line: a DataLoader worker's exception arrives with the worker's traceback in
    its message; the last line is the message itself."""
    last = str(exc).strip().splitlines()[-1]
    return BadShardData(last.removeprefix(f"{BadShardData.__name__}: "))
