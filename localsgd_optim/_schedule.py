"""When to average: the schedule, kept apart from how averaging is done."""

from __future__ import annotations

import numbers
import warnings

__all__ = ["PeriodicSchedule"]


class PeriodicSchedule:
    """Average inside optimizer steps ``k, 2k, 3k, ...`` (steps counted from 1).

    Args:
        k: number of optimizer steps between averaging rounds (an integer >= 1).
    """

    def __init__(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(
                f"k must be an integer >= 1 (optimizer steps between averaging rounds), got {k!r}"
            )
        if k == 1:
            warnings.warn(
                "k=1 averages parameters after every step: that is synchronous data parallel "
                "training, which DistributedDataParallel does faster by overlapping the gradient "
                "all-reduce with backward. Use k > 1 for Local SGD.",
                UserWarning,
                stacklevel=3,
            )
        self.k = int(k)

    def averages_at(self, step: int) -> bool:
        """Whether the ``step``-th call of ``step()`` (1-based) ends with an averaging round."""
        return step % self.k == 0

    def __repr__(self) -> str:
        return f"PeriodicSchedule(k={self.k})"
