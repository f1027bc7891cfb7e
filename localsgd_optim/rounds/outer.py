"""Outer rounds (DiLoCo, SlowMo, and averaging through compressible deltas)."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .._outer import OuterState
from .base import Reducer, Round, RoundContext

__all__ = ["GlobalCopyRound", "OuterRound", "CastReducer"]


class CastReducer(Reducer):
    """Wraps the plain reducer so each bucket travels as ``dtype`` (e.g. bfloat16): fewer bytes.

    Buckets are cast on their way into the packing buffer and widened on the way back; the
    division by the number of ranks happens after widening, at full precision.
    """

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def prepare(self, ctx: RoundContext) -> None:
        ctx.engine.prepare(self.dtype)

    def reduce(self, ctx: RoundContext, contributors: int, joined: bool,
               buffers: list[torch.Tensor] | None = None) -> None:
        ctx.sent += ctx.engine.all_reduce_mean(ctx.group, ctx.size, contributors, send_zeros=joined,
                                               wire_dtype=self.dtype, lo=ctx.lo, hi=ctx.end, buffers=buffers,
                                               weight=ctx.weight)


class GlobalCopyRound(Round):
    """A round that keeps a global copy of the parameters and an outer optimizer stepping it.

    Shared by the blocking and the overlapped outer rounds: the compatibility check, the
    single-process step, the restart at binding and warmup end, and the ``"outer"`` entry.
    """

    per_parameter_state = True

    def __init__(self, outer: OuterState) -> None:
        self.outer = outer

    def outer_optimizer(self) -> torch.optim.Optimizer:
        return self.outer.optimizer

    def prepare(self, ctx: RoundContext) -> None:
        self.outer.check_compatible(ctx.params, ctx.names())
        ctx.engine.prepare(flat=True)

    def flats(self, ctx: RoundContext) -> list[torch.Tensor]:
        """The round's parameters' flat slices, the global copy laid out alike."""
        key, flats = ctx.engine.flats(ctx.lo, ctx.hi)
        self.outer.follow(key, flats, ctx.engine.views(ctx.lo, ctx.hi))
        return flats

    def alone(self, params: list[torch.Tensor]) -> None:
        self.outer.step_alone(params)

    def restart(self, params: list[torch.Tensor], ctx: RoundContext | None = None) -> None:
        if ctx is None:  # not bound: the global copy takes the parameters one by one
            self.outer.take(params)
            return
        flats = self.flats(ctx)
        ctx.engine.stage_in(ctx.lo, ctx.hi)
        self.outer.reset(flats)

    def state(self, entry: dict[str, Any]) -> None:
        entry["outer"] = self.outer.state_dict()

    def check_state(self, entry: dict[str, Any] | None) -> None:
        saved = entry.get("outer") if isinstance(entry, dict) else None
        if saved is not None:
            self.outer.check_state(saved)

    def load_state(self, entry: dict[str, Any] | None, params: list[torch.Tensor]) -> None:
        """Load the global copy and outer optimizer, or restart from ``params`` if none was saved."""
        saved = entry.get("outer") if isinstance(entry, dict) else None
        if saved is None:
            warnings.warn(
                "The checkpoint has no outer-optimizer state (saved without outer_optimizer, compression "
                "or overlap): starting the outer loop from the current parameters.",
                UserWarning,
                stacklevel=6,
            )
            self.outer.take(params)
        else:
            self.outer.load_state_dict(saved)


class OuterRound(GlobalCopyRound):
    """A blocking outer round: pseudo-gradients ``global - local``, averaged, step the global copy.

    The parameters become their pseudo-gradients in place, ``reducer`` averages them, the
    outer optimizer steps the global copy with the mean as ``.grad`` and the new global copy
    is written into the parameters. On a failure the global copy (identical on every rank)
    is put back, so no rank keeps pseudo-gradients as weights.

    Args:
        outer: the global copy and the outer optimizer.
        reducer: how the pseudo-gradients are averaged (plain, cast, int8).
    """

    def __init__(self, outer: OuterState, reducer: Reducer) -> None:
        super().__init__(outer)
        self.reducer = reducer

    def prepare(self, ctx: RoundContext) -> None:
        super().prepare(ctx)
        self.reducer.prepare(ctx)

    def run(self, ctx: RoundContext, contributors: int, joined: bool) -> None:
        flats, engine = self.flats(ctx), ctx.engine
        _, with_buffers = engine.flats(ctx.lo, ctx.end)
        engine.stage_in(ctx.lo, ctx.end)  # parameters sharing memory, module buffers: read once
        self.outer.to_deltas(flats)
        try:
            if contributors:  # every rank has joined: all of them skip the data phase
                self.reducer.reduce(ctx, contributors, joined, with_buffers)
            self.outer.apply(flats, engine.views(ctx.lo, ctx.hi))
        except BaseException:
            self.outer.reset_params(flats)  # never leave pseudo-gradients in the model
            engine.stage_out(ctx.lo, ctx.hi)
            raise
        engine.stage_out(ctx.lo, ctx.end)

    def state(self, entry: dict[str, Any]) -> None:
        super().state(entry)
        self.reducer.state(entry)

    def check_state(self, entry: dict[str, Any] | None) -> None:
        super().check_state(entry)
        self.reducer.check_state(entry)

    def load_state(self, entry: dict[str, Any] | None, params: list[torch.Tensor]) -> None:
        super().load_state(entry, params)
        self.reducer.load_state(entry)
