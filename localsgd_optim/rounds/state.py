"""Averaging the inner optimizer's state with the parameters (Local Adam, "average_optimizer_state")."""

from __future__ import annotations

from typing import Any, Callable

import torch

from .._buckets import BucketEngine
from .base import Round, RoundContext

__all__ = ["WithOptimizerState"]


class WithOptimizerState(Round):
    """Runs ``inner``, then averages the inner optimizer's per-parameter state over the same ranks.

    The state tensors (Adam's ``exp_avg`` and ``exp_avg_sq``, SGD's ``momentum_buffer``; never
    ``step``) get an engine of their own: moved into flat storage the first time a round sees
    them, then reduced in place, one collective per bucket. They are read afresh each round
    (the state appears after the first step and ``load_state_dict`` replaces it); their layout
    is part of the cross-rank check, so a rank whose parameter has no state yet raises on every
    rank. Each round sends the state's bytes on top of the parameters' (AdamW: 3x in all).

    Args:
        inner: the round whose parameters' averaging this extends.
        state: returns the state tensors, in a rank-independent order.
        bucket_cap_bytes: the largest bucket.
    """

    def __init__(self, inner: Round, state: Callable[[], list[torch.Tensor]], bucket_cap_bytes: int) -> None:
        self.inner = inner
        self.kind, self.local, self.per_parameter_state = inner.kind, inner.local, inner.per_parameter_state
        self._state = state
        self._cap = bucket_cap_bytes
        self.engine: BucketEngine | None = None

    def describe(self, step: int) -> str:
        return self.inner.describe(step)

    def outer_optimizer(self) -> torch.optim.Optimizer | None:
        return self.inner.outer_optimizer()

    def prepare(self, ctx: RoundContext) -> None:
        self.inner.prepare(ctx)
        tensors = self._state()
        if self.engine is None:
            self.engine = BucketEngine(tensors, self._cap, flat_params=True)
        else:
            self.engine.refresh(tensors)
        self.engine.prepare()

    def run(self, ctx: RoundContext, contributors: int, joined: bool) -> None:
        self.inner.run(ctx, contributors, joined)
        if contributors and self.engine is not None and self.engine.tensors:
            ctx.sent += self.engine.all_reduce_mean(ctx.group, ctx.size, contributors, send_zeros=joined)

    def wait(self) -> None:
        self.inner.wait()

    def land(self, params: list[torch.Tensor], names: list[str], engine: BucketEngine | None = None) -> None:
        self.inner.land(params, names, engine)

    def alone(self, params: list[torch.Tensor]) -> None:
        self.inner.alone(params)

    def restart(self, params: list[torch.Tensor], engine: BucketEngine | None = None) -> None:
        self.inner.restart(params, engine)

    def state(self, entry: dict[str, Any]) -> None:
        self.inner.state(entry)

    def check_state(self, entry: dict[str, Any] | None) -> None:
        self.inner.check_state(entry)

    def load_state(self, entry: dict[str, Any] | None, params: list[torch.Tensor]) -> None:
        self.inner.load_state(entry, params)
