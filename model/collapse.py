"""A collapse warning that reads the trend, not one step.

Source: Chen & He, CVPR 2021, §4.1 and Fig. 2. Without the stop-gradient the loss goes to its
minimum (−1 for the negative cosine) and the per-channel std of the ℓ2-normalised output ``z``
(``z-std``, :func:`model.loss.z_std`) falls from about ``1/√dim`` towards 0; with it, z-std stays
near ``1/√dim`` while the loss may still drift towards −1 over a long run.

What short CPU runs show (Fashion-MNIST, 960 images, 16 px, batch 32, ``--lr 0.8``, dim 2048,
240 steps; medians per 20 steps): with ``--no-stop-grad`` the loss reaches −0.90 and z-std falls to
0.36/√dim; with ``--predictor identity`` the loss stalls near −0.74 while z-std falls steadily
from 1.00 to 0.52/√dim; neither reaches a tenth of 1/√dim, the old per-step threshold, which
therefore never fired. The default run of the same size keeps z-std at 0.98-1.01/√dim (loss −0.71);
the 3-epoch 32 px default run of the README sits at 0.79/√dim (loss −0.59). So the detector looks at
the median over a window of readbacks (robust to single noisy steps) and fires once:

* **cosine** similarity: median z-std < ``std_ratio`` (0.65) × 1/√dim **and** median loss <
  ``loss_level`` (−0.7): the output has lost diversity while the two views agree closely — the
  paper's collapse signature;
* **cross-entropy** similarity (§4.5): the loss has no fixed floor (its minimum is the entropy of
  ``softmax(z)``), so only z-std is read, with the stricter ``0.5 × std_ratio`` (0.325) × 1/√dim;
* either similarity: median z-std < 0.1 × 1/√dim (a complete collapse) fires whatever the loss.
"""
from __future__ import annotations

import math
import statistics
from typing import Iterable, Sequence

from .loss import SIMILARITIES


class CollapseDetector:
    """Consumes ``(step, loss, z_std)`` readbacks and returns one warning when they say collapse.

    Args:
        dim: projector output width; the healthy z-std is ``1/√dim`` (paper §4.1).
        similarity: ``cosine`` or ``cross-entropy`` (the run's ``--similarity``).
        window: readbacks whose medians are judged (20: one ``--log-every 20`` batch of steps).
        std_ratio: z-std level, as a fraction of ``1/√dim``, below which the output counts as
            collapsing (0.65; healthy runs measured 0.79-1.01, collapsing ones 0.36-0.60).
        loss_level: cosine loss below which the views count as agreeing closely (−0.7).

    Call :meth:`update` with each batch of readbacks (host floats, in step order). It returns the
    warning text the first time the criterion holds and None otherwise; :attr:`fired_at` keeps the
    last step of the window that fired.

    Raises:
        ValueError: unknown ``similarity`` or ``dim``/``window`` < 1.
    """

    def __init__(self, dim: int, similarity: str = "cosine", window: int = 20, std_ratio: float = 0.65,
                 loss_level: float = -0.7):
        if similarity not in SIMILARITIES:
            raise ValueError(f"unknown similarity {similarity!r}; choose one of {', '.join(SIMILARITIES)}")
        if dim < 1 or window < 1:
            raise ValueError(f"dim and window must be >= 1, got {dim} and {window}")
        self.dim, self.similarity, self.window = dim, similarity, window
        self.healthy = 1.0 / math.sqrt(dim)
        self.std_ratio, self.loss_level = std_ratio, loss_level
        self.rows: list[tuple[int, float, float]] = []
        self.fired_at: int | None = None

    @property
    def fired(self) -> bool:
        return self.fired_at is not None

    def update(self, readbacks: Iterable[Sequence[float]]) -> str | None:
        """Add ``(step, loss, z_std)`` rows; return the warning once, when the window says collapse.

        Non-finite rows (skipped steps) are ignored.
        """
        self.rows += [(int(s), float(l), float(z)) for s, l, z in readbacks if math.isfinite(l) and math.isfinite(z)]
        del self.rows[:-self.window]
        if self.fired or len(self.rows) < self.window:
            return None
        loss = statistics.median(r[1] for r in self.rows)
        ratio = statistics.median(r[2] for r in self.rows) / self.healthy
        if self.similarity == "cosine":
            collapsing = ratio < self.std_ratio and loss < self.loss_level
        else:
            collapsing = ratio < 0.5 * self.std_ratio
        if not (collapsing or ratio < 0.1):
            return None
        first, last = self.rows[0][0], self.rows[-1][0]
        self.fired_at = last
        return (f"warning: the output is collapsing (paper §4.1, Fig. 2): over steps {first}-{last} the median "
                f"z-std is {ratio:.2f} × 1/sqrt(dim) (healthy ≈ 1) and the median loss {loss:+.3f}"
                f"{' (−1 = both views give the same output)' if self.similarity == 'cosine' else ''}; "
                f"without stop-gradient or a learned predictor SimSiam collapses to a constant")


def first_warning(curve: Iterable[Sequence[float]], dim: int, similarity: str = "cosine",
                  every: int = 20) -> tuple[int, str] | None:
    """Replay a recorded per-step curve ``[[step, loss, z_std], ...]`` through a
    :class:`CollapseDetector` in batches of ``every`` rows, as ``train.py`` feeds it.

    Returns:
        ``(step, message)`` of the warning, or None when it never fires.
    """
    detector, batch = CollapseDetector(dim, similarity), []
    for row in curve:
        batch.append(row)
        if len(batch) == every:
            if (message := detector.update(batch)) is not None:
                return detector.fired_at, message
            batch = []
    if batch and (message := detector.update(batch)) is not None:
        return detector.fired_at, message
    return None
