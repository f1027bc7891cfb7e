"""The constructor's arguments, validated once into an immutable :class:`Config`."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from ._outer import OuterFactory
from ._schedule import PeriodSpec, Schedule, TimedSchedule, _is_int
from ._sharded import resolve_group
from .compression import NAMED, Compression

__all__ = ["Config", "plain_average_outer"]

#: compression name -> the dtype pseudo-gradients travel in (int8 has its own reducer)
WIRE_DTYPES: dict[str | None, torch.dtype | None] = {None: None, "bf16": torch.bfloat16, "int8": None}


def plain_average_outer(params: list[torch.Tensor]) -> Optimizer:
    """global - mean(global - local) = mean(local): averaging, through (compressible) deltas."""
    return torch.optim.SGD(params, lr=1.0)


@dataclass(frozen=True)
class Config:
    """Every setting of a :class:`~localsgd_optim.LocalSGDOptimizer`, checked.

    ``outer_optimizer`` is already resolved: ``compression`` and ``overlap_steps`` need a
    global copy, so without an explicit outer optimizer they get the plain-average one.
    """

    schedule: Schedule
    process_group: dist.ProcessGroup | None
    bucket_cap_mb: float
    sync_on_init: bool
    local_k: int  # 0: no hierarchical rounds
    local_group: dist.ProcessGroup | None
    buffers: nn.Module | None
    outer_optimizer: OuterFactory | None
    compression: str | None
    overlap_steps: int
    overlap_mix: float
    check_finite: bool
    flat_params: bool = True
    average_optimizer_state: bool = False
    fragments: int = 1

    @classmethod
    def from_args(cls, optimizer: Any, k: PeriodSpec, *, process_group: Any, bucket_cap_mb: Any,
                  sync_on_init: bool, warmup_steps: Any, local_k: Any, local_group: Any, buffers: Any,
                  outer_optimizer: Any, compression: Any, overlap_steps: Any, overlap_mix: Any,
                  check_finite: bool, flat_params: bool = True, average_optimizer_state: bool = False,
                  fragments: Any = 1, round_every_s: Any = None) -> "Config":
        """Check the arguments in a fixed order; the first bad one raises, naming it and the fix."""
        _check_optimizer(optimizer)
        if (isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, numbers.Real)
                or not math.isfinite(bucket_cap_mb) or bucket_cap_mb <= 0):
            raise ValueError(f"bucket_cap_mb must be a finite number > 0 (MiB), got {bucket_cap_mb!r}")
        process_group = resolve_group(process_group)
        if buffers is not None and not isinstance(buffers, nn.Module):
            raise TypeError(
                f"buffers must be the nn.Module whose buffers to average (e.g. buffers=model), "
                f"got {type(buffers).__name__}"
            )
        schedule = _schedule(k, warmup_steps, round_every_s)
        if outer_optimizer is not None and not callable(outer_optimizer):
            raise TypeError(
                "outer_optimizer must be a callable mapping a list of tensors to an Optimizer, e.g. "
                f"localsgd_optim.diloco(), got {type(outer_optimizer).__name__}"
            )
        _check_compression(optimizer, compression, buffers)
        _check_overlap(overlap_steps, overlap_mix, compression, local_k)
        _check_timed(schedule, local_k, overlap_steps, fragments, buffers)
        overlap_mix = 0.5 if overlap_mix is None else overlap_mix
        if (compression is not None or overlap_steps) and outer_optimizer is None:
            outer_optimizer = plain_average_outer  # compressed deltas need a global copy
        if outer_optimizer is not None and not sync_on_init:
            raise ValueError(
                "outer_optimizer needs sync_on_init=True: the global copy must start identical on "
                "every rank, got sync_on_init=False"
            )
        if (local_k is None) != (local_group is None):
            raise ValueError(
                "local_k and local_group go together (hierarchical averaging), got "
                f"local_k={local_k!r}, local_group={local_group!r}; pass both or neither"
            )
        if local_k is not None and not (_is_int(local_k) and local_k >= 1):
            raise ValueError(f"local_k must be an integer >= 1, got {local_k!r}")
        if not isinstance(flat_params, bool):
            raise TypeError(f"flat_params must be True or False, got {flat_params!r}")
        if not isinstance(average_optimizer_state, bool):
            raise TypeError(f"average_optimizer_state must be True or False, got {average_optimizer_state!r}")
        if average_optimizer_state and (compression is not None or overlap_steps):
            raise ValueError(
                "average_optimizer_state with compression or overlap_steps is not supported yet (the state "
                f"is averaged as values, at full precision, in blocking rounds), got compression={compression!r}, "
                f"overlap_steps={overlap_steps!r}; pass one of them"
            )
        _check_fragments(fragments, schedule, local_k, average_optimizer_state, overlap_steps)
        return cls(schedule=schedule, process_group=process_group, bucket_cap_mb=float(bucket_cap_mb),
                   sync_on_init=bool(sync_on_init), local_k=int(local_k) if local_k is not None else 0,
                   local_group=local_group, buffers=buffers, outer_optimizer=outer_optimizer,
                   compression=compression, overlap_steps=int(overlap_steps),
                   overlap_mix=float(overlap_mix), check_finite=bool(check_finite),
                   flat_params=flat_params, average_optimizer_state=average_optimizer_state,
                   fragments=int(fragments))

    @property
    def wire_dtype(self) -> torch.dtype | None:
        return WIRE_DTYPES.get(self.compression) if isinstance(self.compression, str) else None

    @property
    def chunked(self) -> Compression | None:
        """The top-k / low-bit compression, if that is what ``compression`` names."""
        if isinstance(self.compression, Compression):
            return self.compression
        return NAMED.get(self.compression) if isinstance(self.compression, str) else None

    def settings(self, outer: Optimizer | None) -> dict[str, Any]:
        """What every rank must agree on (``outer``: the built outer optimizer, if any).

        Compared exactly (the digest is of their ``repr``): floats are kept as floats or written
        with ``repr``, which round-trips, never rounded (``:g``, a tensor's ``repr``); a chunked
        compressor by its exact settings and what they derive (see :meth:`Compression.settings`).
        """
        chunked = self.chunked
        return {"k": self.schedule.description, "warmup_steps": self.schedule.warmup_steps,
                "local_k": self.local_k, "bucket_cap_mb": self.bucket_cap_mb,
                "compression": self.compression if chunked is None else chunked.settings(),
                "outer_optimizer": None if outer is None else _describe_optimizer(outer),
                "overlap": [self.overlap_steps, self.overlap_mix], "flat_params": self.flat_params,
                "average_optimizer_state": self.average_optimizer_state,
                **({"fragments": self.fragments} if self.fragments > 1 else {})}


def _describe_optimizer(optimizer: Optimizer) -> str:
    """``SGD(dampening=0, ..., lr=0.7, ...)``: the type and every default, exactly."""
    defaults = ", ".join(f"{key}={_exact(value)}" for key, value in sorted(optimizer.defaults.items()))
    return f"{type(optimizer).__name__}({defaults})"


def _exact(value: Any) -> str:
    """``repr(value)``, but a tensor (an ``lr=torch.tensor(0.7)``) with its exact values: its own ``repr``
    rounds to four decimals, so ``tensor(0.7)`` and ``tensor(0.70001)`` would compare equal."""
    if isinstance(value, torch.Tensor):
        return f"tensor({value.tolist()!r})"
    if type(value) in (list, tuple):
        inner = ", ".join(map(_exact, value))
        return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
    return repr(value)


def _schedule(k: Any, warmup_steps: Any, round_every_s: Any) -> Schedule:
    """The schedule: every ``k`` steps (``None``: 8), or every ``round_every_s`` seconds."""
    if round_every_s is None:
        return Schedule(8 if k is None else k, warmup_steps)
    if k is not None:
        raise ValueError(
            f"k={k!r} and round_every_s={round_every_s!r} both say when to average: pass k for rounds every k "
            "steps, or round_every_s for rounds every so many seconds, not both")
    return TimedSchedule(round_every_s, warmup_steps)


def _check_timed(schedule: Schedule, local_k: Any, overlap_steps: Any, fragments: Any, buffers: Any) -> None:
    if not isinstance(schedule, TimedSchedule):
        return
    if local_k is not None:  # it counts steps across ranks, which time-budgeted replicas do not share
        raise ValueError(
            f"round_every_s with local_k={local_k!r} is not supported: replicas at different speeds take "
            "different step counts, and local_k counts steps; pass one of them")
    if overlap_steps and fragments != 1:
        raise ValueError(f"round_every_s with overlap_steps={overlap_steps!r} and fragments={fragments!r} is not "
                         "supported yet: pass overlap_steps (asynchronous rounds) or fragments")
    if overlap_steps and buffers is not None:
        raise ValueError(
            f"round_every_s with overlap_steps={overlap_steps!r} and buffers= is not supported: asynchronous rounds "
            "wait for no replica, and module buffers are averaged in a blocking collective; drop buffers= (or "
            "overlap_steps)")


def _check_optimizer(optimizer: Any) -> None:
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            "optimizer must be a torch.optim.Optimizer instance, e.g. "
            f"torch.optim.AdamW(model.parameters()), got {type(optimizer).__name__}: {optimizer!r}"
        )


def _check_compression(optimizer: Optimizer, compression: Any, buffers: Any) -> None:
    named = isinstance(compression, str) and (compression in WIRE_DTYPES or compression in NAMED)
    if not (compression is None or named or isinstance(compression, Compression)):
        raise ValueError(
            "compression must be None, 'bf16', 'int8', 'int4', 'int2', or localsgd_optim.topk(...) / "
            f"localsgd_optim.quantize(...), got {compression!r}"
        )
    if compression is not None and any(p.is_complex() for g in optimizer.param_groups for p in g["params"]):
        raise ValueError(f"compression={compression!r} does not support complex parameters yet")
    if compression is not None and buffers is not None:
        raise ValueError(
            f"compression={compression!r} with buffers= is not supported: buffers are absolute "
            "values, not deltas, and would be rounded; average buffers without compression"
        )


def _check_overlap(overlap_steps: Any, overlap_mix: Any, compression: Any, local_k: Any) -> None:
    if not (_is_int(overlap_steps) and overlap_steps >= 0):
        raise ValueError(f"overlap_steps must be an integer >= 0, got {overlap_steps!r}")
    if overlap_mix is not None and (not isinstance(overlap_mix, numbers.Real) or not 0.0 <= overlap_mix <= 1.0):
        raise ValueError(f"overlap_mix must be a number in [0, 1], got {overlap_mix!r}")
    if overlap_mix is not None and not overlap_steps:
        raise ValueError(
            f"overlap_mix={overlap_mix!r} only applies to overlapped rounds, but overlap_steps=0; pass "
            "overlap_steps >= 1 with it, or drop overlap_mix"
        )
    if overlap_steps and compression is not None:
        raise ValueError("overlap_steps with compression is not supported yet; pass one of them")
    if overlap_steps and local_k is not None:
        raise ValueError("overlap_steps with hierarchical averaging (local_k) is not supported yet")


def _check_fragments(fragments: Any, schedule: Schedule, local_k: Any, average_optimizer_state: bool,
                     overlap_steps: int) -> None:
    if not (_is_int(fragments) and fragments >= 1):
        raise ValueError(f"fragments must be an integer >= 1 (1: the whole model at once), got {fragments!r}")
    if fragments == 1:
        return
    k = schedule.spec
    if not isinstance(schedule, TimedSchedule) and (not _is_int(k) or k < fragments):  # (round_every_s: each
        # fragment once per that many seconds, in turn)
        raise ValueError(
            f"fragments={fragments} needs an integer k >= fragments (every fragment syncs once per period, "
            f"at staggered steps), got k={k!r}; pass k >= {fragments}, or fragments=1 for a period schedule"
        )
    if local_k is not None:
        raise ValueError("fragments with hierarchical averaging (local_k) is not supported yet; pass one of them")
    if average_optimizer_state:
        raise ValueError("fragments with average_optimizer_state is not supported yet; pass one of them")
    if isinstance(schedule, TimedSchedule):
        return  # (overlap_steps is refused with it: _check_timed)
    gap = k // fragments  # the fewest steps between two fragments' syncs
    if overlap_steps >= gap:
        raise ValueError(
            f"overlap_steps={overlap_steps} with fragments={fragments} and k={k}: a fragment's round must land "
            f"before the next fragment's starts, {gap} step(s) later (k // fragments); pass overlap_steps < {gap}"
        )
