"""The harness's arithmetic: timed windows, throughput, spread and input-stall share.

Conventions (used by every number ``bench/throughput.py`` prints):

- an *image* is one pair of views (one sample of a :class:`pipeline.TwoViewBatch`); a *view* is
  one of the two augmented crops, so views/s = 2 × images/s;
- times are wall-clock seconds from :func:`time.perf_counter` (or an injected clock in tests);
  on a GPU the caller passes ``sync=torch.cuda.synchronize`` so queued kernels are counted;
- warm-up steps are run and discarded before the first timed window (first-epoch page cache,
  worker start-up, FFCV's numba compile, DALI's first iterations: NVIDIA/DALI#1415);
- each point is measured ``repeats`` times; the median is reported with min/max and the spread
  ``(max - min) / median`` in percent.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

Clock = Callable[[], float]


def images_per_s(images: int, seconds: float) -> float:
    """Throughput in images (view pairs) per second: ``images / seconds``.

    Raises:
        ValueError: ``seconds <= 0`` or ``images < 0``.
    """
    if seconds <= 0:
        raise ValueError(f"a timed window must last > 0 s, got {seconds}")
    if images < 0:
        raise ValueError(f"image count must be >= 0, got {images}")
    return images / seconds


def views_per_s(images: int, seconds: float, views: int = 2) -> float:
    """Views per second: ``views`` crops per image (2 for SimSiam) × :func:`images_per_s`."""
    return views * images_per_s(images, seconds)


def stall_share(end_to_end_ips: float, model_only_ips: float) -> float:
    """Input-stall share of the end-to-end step time, in [0, 1].

    With the model alone (synthetic input already on the device) a step takes ``1/model_only_ips``
    s per image; end to end it takes ``1/end_to_end_ips``. The difference is time the model waited
    for (or shared the CPU with) the input pipeline, as a fraction of the end-to-end time:
    ``1 - end_to_end_ips / model_only_ips``, clipped to [0, 1] (measurement noise can make the
    end-to-end run a little faster than model-only).
    """
    if end_to_end_ips <= 0 or model_only_ips <= 0:
        raise ValueError("throughputs must be > 0 images/s")
    return min(1.0, max(0.0, 1.0 - end_to_end_ips / model_only_ips))


@dataclass
class Spread:
    """Median of repeated measurements with their range.

    Attributes:
        median, min, max: of the values (same unit as the values).
        spread_pct: ``100 * (max - min) / median`` (0 for a single value).
        values: the raw values, in measurement order.
    """

    median: float
    min: float
    max: float
    spread_pct: float
    values: list[float] = field(default_factory=list)


def summarize(values: Sequence[float]) -> Spread:
    """:class:`Spread` of ``values`` (at least one).

    Raises:
        ValueError: no values.
    """
    if not values:
        raise ValueError("nothing to summarize")
    med = statistics.median(values)
    lo, hi = min(values), max(values)
    return Spread(med, lo, hi, 100.0 * (hi - lo) / med if med else 0.0, list(values))


@dataclass
class Window:
    """One timed window.

    Attributes:
        seconds: wall time of the window (s).
        steps: steps (batches) run in it.
        images: images (view pairs) processed in it.
        data_s: part of ``seconds`` spent waiting for the input (s; 0 when not measured).
    """

    seconds: float
    steps: int
    images: int
    data_s: float = 0.0

    @property
    def images_per_s(self) -> float:
        return images_per_s(self.images, self.seconds)

    @property
    def step_s(self) -> float:
        """Mean seconds per step."""
        return self.seconds / self.steps


def timed_window(step: Callable[[], int], steps: int, clock: Clock = time.perf_counter,
                 sync: Callable[[], None] | None = None) -> Window:
    """Run ``step`` ``steps`` times between two clock readings and count the images it reports.

    ``step()`` runs one step and returns the number of images it processed; it may return a pair
    ``(images, data_seconds)`` to report how long it waited for its input. ``sync`` (e.g.
    ``torch.cuda.synchronize``) is called before the first and after the last reading so work
    queued on a GPU is inside the window.
    """
    if steps < 1:
        raise ValueError(f"a timed window needs >= 1 step, got {steps}")
    if sync is not None:
        sync()
    t0 = clock()
    images, data_s = 0, 0.0
    for _ in range(steps):
        r = step()
        if isinstance(r, tuple):
            images += r[0]
            data_s += r[1]
        else:
            images += r
    if sync is not None:
        sync()
    return Window(clock() - t0, steps, images, data_s)


def measure(step: Callable[[], int], warmup: int, steps: int, repeats: int, clock: Clock = time.perf_counter,
            sync: Callable[[], None] | None = None, on_first: Callable[[float], None] | None = None) -> list[Window]:
    """``warmup`` discarded steps, then ``repeats`` timed windows of ``steps`` steps each.

    ``on_first(seconds)`` receives the duration of the first (warm-up) step, so the caller can
    record start-up cost or project the cost of the point before going on.
    """
    for i in range(warmup):
        t0 = clock()
        step()
        if sync is not None:
            sync()
        if i == 0 and on_first is not None:
            on_first(clock() - t0)
    return [timed_window(step, steps, clock, sync) for _ in range(repeats)]


def steps_for(batch: int, min_images: int, min_steps: int = 1) -> int:
    """Steps per timed window so that it covers at least ``min_images`` images and ``min_steps`` steps."""
    return max(min_steps, -(-min_images // batch))


def cycle_epochs(loader) -> Iterable:
    """Batches of ``loader`` forever, calling ``set_epoch(0, 1, ...)`` at each new epoch."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        n = 0
        for batch in loader:
            n += 1
            yield batch
        if n == 0:
            raise RuntimeError("the loader yielded no batch in a whole epoch")
        epoch += 1
