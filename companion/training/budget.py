"""Training to a wall-clock budget: how many iterations fit, and when to stop.

:func:`companion.training.train.train` with ``TrainConfig.time_budget`` (``train --time-budget MINUTES``)
does not know beforehand how fast a machine steps: a free Colab T4, a laptop CPU and an H100 differ
by 100x. :class:`TimeBudget` times the first iterations (after two unmeasured ones: allocator,
kernel choice, compilation), then sizes the run so that its warm-up and cosine schedule end at
the budget, and, whatever happens later (a slower phase, a busy machine), says when to stop so
that the last checkpoint is written inside it.

Examples
--------
>>> now = [0.0]
>>> budget = TimeBudget(120.0, started=0.0, clock=lambda: now[0], probe_steps=3, warmup_steps=1)
>>> for done in range(1, 5):  # 2 s per iteration
...     now[0] = 2.0 * done
...     more = budget.sized_iterations(done)
>>> more  # after 4 iterations, at 8 s: (120 s - 3 % reserve - 8 s) / 2 s
54
>>> now[0] = 62.0
>>> budget.sized_iterations(31), budget.expired()  # past half the budget: sized once more
(27, False)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

__all__ = ["TimeBudget", "RESIZE_AT"]

#: Fractions of the budget at which the run is sized again with the rate since the last sizing.
RESIZE_AT: tuple[float, ...] = (0.5, 0.75, 0.9)


class TimeBudget:
    """A run's wall-clock budget of ``seconds``, counted from ``started``.

    Parameters
    ----------
    seconds : float
        The budget.
    started : float, optional
        When the budget began (a ``clock()`` value); default now.
    probe_steps : int
        Iterations timed to measure the rate (after ``warmup_steps`` untimed ones). The window
        is extended to ``min_probe_s`` seconds, or 5 % of the budget, when that is longer.
    reserve : float
        Fraction of the budget kept free for what the rate does not show (checkpoints written
        outside the timed window, the final copy); at least ``min_reserve_s`` seconds.
    clock : callable
        The time source (``time.perf_counter``).
    sizes : bool
        Measure and size (False: a resumed run, sized when it began; only :meth:`expired`).
    """

    def __init__(
        self,
        seconds: float,
        *,
        started: float | None = None,
        probe_steps: int = 10,
        warmup_steps: int = 2,
        min_probe_s: float = 2.0,
        reserve: float = 0.03,
        min_reserve_s: float = 1.0,
        clock: Callable[[], float] = time.perf_counter,
        sizes: bool = True,
    ) -> None:
        if not seconds > 0:
            raise ValueError(f"a time budget must be positive, got {seconds!r} s")
        self.clock = clock
        self.started = clock() if started is None else float(started)
        self.deadline = self.started + float(seconds)
        self.reserve_s = max(reserve * seconds, min_reserve_s)
        self.probe_steps, self.warmup_steps = probe_steps, warmup_steps
        self.min_probe_s = max(min_probe_s, 0.05 * seconds)  # long enough to see a steady rate
        self._probe_start: float | None = None
        self._probe_done = 0
        self.seconds_per_step: float | None = None
        self._sizing = bool(sizes)
        self._resizes = list(RESIZE_AT)

    def sized_iterations(self, done: int) -> int | None:
        """After the ``done``-th iteration of this process: how many further iterations fit the
        budget when it sizes the run, else ``None``.

        It sizes the run when the first rate has been measured, and again at
        :data:`RESIZE_AT` of the budget with the rate since the last sizing (a machine that
        slowed down or sped up; each time the cosine schedule stretches or shrinks a little).
        The caller synchronises with the device before each call while :meth:`probing` (a CUDA
        host clock runs ahead of the GPU otherwise).
        """
        if not self._sizing:
            return None
        now = self.clock()
        if self.seconds_per_step is None:
            if done == self.warmup_steps:
                self._probe_start = now
                return None
            if self._probe_start is None or done < self.warmup_steps + self.probe_steps:
                return None
            if (
                now - self._probe_start < self.min_probe_s
                and now + self.min_probe_s < self.deadline - self.reserve_s
            ):
                return None  # very fast steps: time a longer window
        elif not self._resize_due(now) or done == self._probe_done:
            return None
        else:
            self._resizes.pop(0)
        self.seconds_per_step = (now - self._probe_start) / (done - (self._probe_done or self.warmup_steps))
        self._probe_start, self._probe_done = now, done
        self._sizing = bool(self._resizes)
        return max(0, math.floor((self.deadline - self.reserve_s - now) / self.seconds_per_step))

    def _resize_due(self, now: float) -> bool:
        return bool(self._resizes) and now >= self.started + self._resizes[0] * (self.deadline - self.started)

    def probing(self, done: int) -> bool:
        """Whether the next :meth:`sized_iterations` call may measure (sync before it)."""
        if not self._sizing or done < self.warmup_steps:
            return False
        return self.seconds_per_step is None or self._resize_due(self.clock())

    def expired(self) -> bool:
        """Whether the run must stop now to write its last checkpoint within the budget."""
        step = self.seconds_per_step or 0.0
        return self.clock() + step + 0.5 * self.reserve_s >= self.deadline
