"""Averaging the inner optimizer's state with the parameters (Local Adam, "average_optimizer_state")."""

from __future__ import annotations

from typing import Callable

import torch

from .._buckets import BucketEngine
from .base import Reducer, RoundContext

__all__ = ["OptimizerStateReducer"]


class OptimizerStateReducer(Reducer):
    """Averages the inner optimizer's per-parameter state over a round's ranks: a reducer a round carries.

    The state tensors (Adam's ``exp_avg`` and ``exp_avg_sq``, SGD's ``momentum_buffer``; never
    ``step``) get an engine of their own: moved into flat storage the first time a round sees
    them, then reduced in place, one collective per bucket. They are read afresh each round
    (the state appears after the first step and ``load_state_dict`` replaces it); their layout
    is part of the cross-rank check, so a rank whose parameter has no state yet raises on every
    rank, and the NaN scan covers them. Each round sends the state's bytes on top of the
    parameters' (AdamW: 3x in all).

    Args:
        state: returns the state tensors, in a rank-independent order.
        bucket_cap_bytes: the largest bucket.
    """

    def __init__(self, state: Callable[[], list[torch.Tensor]], bucket_cap_bytes: int) -> None:
        self._state = state
        self._cap = bucket_cap_bytes
        self.engine: BucketEngine | None = None

    def prepare(self, ctx: RoundContext) -> None:
        tensors = self._state()
        if self.engine is None:
            self.engine = BucketEngine(tensors, self._cap, flat_params=True)
        else:
            self.engine.refresh(tensors)
        self.engine.prepare()

    def first_nonfinite(self) -> int:
        """Index (among the state tensors) of this rank's first holding NaN/Inf, or -1."""
        return self.engine.first_nonfinite() if self.engine is not None and self.engine.tensors else -1

    def reduce(self, ctx: RoundContext, contributors: int, joined: bool,
               buffers: list[torch.Tensor] | None = None) -> None:
        if contributors and self.engine is not None and self.engine.tensors:
            ctx.sent += self.engine.all_reduce_mean(ctx.group, ctx.size, contributors, send_zeros=joined,
                                                    weight=ctx.weight)
