"""Round strategies, one module each, and the one function that picks them from the settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .._buckets import bucket_cap_bytes
from .._config import Config
from .._dist import RoundKind
from .._outer import OuterState
from .._schedule import Cursor, FragmentSchedule, TimedCursor, TimedSchedule
from .average import AverageRound
from .base import Reducer, Round, RoundContext
from .chunked import ChunkedReducer, ReduceScatterReducer
from .fragments import FragmentedRound, split_fragments
from .int8 import Int8Reducer
from .outer import CastReducer, OuterRound
from .overlap import OverlapRound
from .state import OptimizerStateReducer

__all__ = ["RoundTable", "build_rounds", "Round", "RoundContext", "Reducer", "OptimizerStateReducer"]


@dataclass(frozen=True)
class RoundTable:
    """The round run for each event. Only :attr:`scheduled` may hold state (a global copy)."""

    warmup: Round  #: a synchronous warmup step
    sync: Round  #: an explicit ``sync()``: always a plain average
    scheduled: Round  #: a global round after warmup: plain, outer, compressed or overlapped
    local: Round | None  #: a hierarchical round within the local group

    @property
    def per_parameter_state(self) -> bool:
        return self.scheduled.per_parameter_state

    def outer_optimizer(self) -> torch.optim.Optimizer | None:
        return self.scheduled.outer_optimizer()

    def restart(self, params: list[torch.Tensor], ctx: RoundContext | None = None) -> None:
        self.scheduled.restart(params, ctx)

    def breaks(self, n_params: int) -> list[int]:
        """Tensor indices no bucket may straddle: the scheduled round's (fragment boundaries, the
        buffers an overlapped round averages apart)."""
        return self.scheduled.breaks(n_params)

    def state(self, entry: dict[str, Any]) -> None:
        self.scheduled.state(entry)

    def check_state(self, entry: dict[str, Any] | None) -> None:
        self.scheduled.check_state(entry)

    def load_state(self, entry: dict[str, Any] | None, params: list[torch.Tensor]) -> None:
        self.scheduled.load_state(entry, params)


def build_rounds(config: Config, params: list[torch.Tensor],
                 optimizer_state: Callable[[], list[torch.Tensor]] | None = None) -> tuple[Cursor, RoundTable]:
    """The schedule's cursor and the round table for ``config`` (the only reader of its variant options).

    ``params`` are the parameters at construction: a global copy is cloned from them.
    ``optimizer_state`` returns the inner optimizer's state tensors, averaged with the parameters
    at warmup, scheduled and local rounds when ``config.average_optimizer_state`` (not by ``sync()``).
    """
    if isinstance(config.schedule, TimedSchedule):  # round_every_s: the clock decides (fragments: in turn)
        cursor: Cursor = TimedCursor(config.schedule, fragments=config.fragments, overlap_steps=config.overlap_steps)
    elif config.fragments > 1:  # Streaming DiLoCo: one fragment per round, each its own scheduled round
        cursor = Cursor(FragmentSchedule(config.schedule, config.fragments), config.local_k, config.overlap_steps)
    else:
        cursor = Cursor(config.schedule, config.local_k, config.overlap_steps)
    if config.fragments > 1:
        bounds = split_fragments(params, config.fragments)
        scheduled: Round = FragmentedRound(bounds, [_scheduled(config, params[lo:hi]) for lo, hi in bounds], cursor)
    else:
        scheduled = _scheduled(config, params)
    warmup: Round = AverageRound(RoundKind.SCHEDULED)
    local: Round | None = AverageRound(RoundKind.LOCAL, local=True) if config.local_k else None
    if config.average_optimizer_state and optimizer_state is not None:
        rider = OptimizerStateReducer(optimizer_state, bucket_cap_bytes(config.bucket_cap_mb))
        for round_ in (warmup, scheduled, local):
            if round_ is not None:
                round_.riders = (rider,)
    table = RoundTable(warmup=warmup, sync=AverageRound(RoundKind.SYNC), scheduled=scheduled, local=local)
    return cursor, table


def _scheduled(config: Config, params: list[torch.Tensor]) -> Round:
    """The scheduled round over ``params`` (the whole model, or one fragment of it)."""
    if config.outer_optimizer is None:
        return AverageRound(RoundKind.SCHEDULED)
    if not params:
        raise ValueError(
            f"outer_optimizer, compression={config.compression!r} and overlap_steps={config.overlap_steps} need at "
            "least one trainable floating-point parameter (requires_grad=True) to keep a global copy of; every "
            "parameter is frozen or not floating-point: unfreeze one, or drop those options"
        )
    outer = OuterState(params, config.outer_optimizer, config.flat_params)
    if config.overlap_steps:  # (round_every_s: launched without waiting for the other replicas)
        return OverlapRound(outer, config.overlap_mix, asynchronous=isinstance(config.schedule, TimedSchedule))
    if config.chunked is not None:
        reducer = ReduceScatterReducer if config.chunked.collective == "reduce_scatter" else ChunkedReducer
        return OuterRound(outer, reducer(params, config.chunked, config.flat_params))
    if config.compression == "int8":
        return OuterRound(outer, Int8Reducer(params, config.flat_params))
    if config.wire_dtype is not None:
        return OuterRound(outer, CastReducer(config.wire_dtype))
    return OuterRound(outer, Reducer())
