"""Streaming rounds: the model in contiguous fragments, one fragment synced per round."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .._buckets import BucketEngine
from .._schedule import Cursor, FragmentSchedule
from .base import Round, RoundContext

__all__ = ["FragmentedRound", "split_fragments"]


def split_fragments(params: Sequence[torch.Tensor], fragments: int) -> list[tuple[int, int]]:
    """``fragments`` contiguous, non-empty ``[lo, hi)`` ranges of ``params``, balanced by bytes.

    Boundary ``i`` goes after the parameter whose cumulative size is nearest ``i / fragments``
    of the total, moved as little as needed to leave every fragment a parameter.
    """
    n = len(params)
    if n < fragments:
        raise ValueError(
            f"fragments={fragments} needs at least as many parameters, got {n}; pass fragments <= {n}"
        )
    sizes = [p.numel() * p.element_size() for p in params]
    total, cumulative, acc = sum(sizes), [], 0
    for size in sizes:
        acc += size
        cumulative.append(acc)  # bytes of params[: j + 1]
    bounds, lo = [], 0
    for i in range(1, fragments):
        target = total * i / fragments
        hi = min(range(lo + 1, n - (fragments - i) + 1), key=lambda j: abs(cumulative[j - 1] - target))
        bounds.append((lo, hi))
        lo = hi
    bounds.append((lo, n))
    return bounds


class FragmentedRound(Round):
    """The scheduled round of Streaming DiLoCo: each round syncs one fragment of the model.

    Fragment ``i`` is ``params[lo:hi]`` (the last also takes the averaged buffers) with a round
    of its own (``inners[i]``: plain, outer, compressed or overlapped, built on the fragment's
    parameters, so an outer optimizer's state is per fragment) and a bucket engine of its own
    over the fragment's tensors. Which fragment a round syncs is a function of the step
    (:meth:`FragmentSchedule.fragment_at`). At most one overlapped fragment is in flight.

    Args:
        schedule: the streaming schedule.
        bounds: each fragment's ``[lo, hi)`` range of the parameters.
        inners: each fragment's round.
        bucket_cap_bytes: the largest bucket of a fragment's engine.
        cursor: the optimizer's step counter (a single-process round has no context).
    """

    def __init__(self, schedule: FragmentSchedule, bounds: list[tuple[int, int]], inners: list[Round],
                 bucket_cap_bytes: int, cursor: Cursor) -> None:
        self.schedule, self.bounds, self.inners = schedule, bounds, inners
        self.cap = bucket_cap_bytes
        self.cursor = cursor
        self.per_parameter_state = True  # the fragments' bounds are indices into the parameters
        self.engines: list[BucketEngine | None] = [None] * len(inners)
        self._sub: RoundContext | None = None
        self._in_flight: int | None = None  # the overlapped fragment not landed yet

    def describe(self, step: int) -> str:
        return f"fragment {self.schedule.fragment_at(step)}'s round at step {step}"

    def outer_optimizer(self) -> torch.optim.Optimizer | None:
        return self.inners[0].outer_optimizer()

    def _context(self, ctx: RoundContext, i: int) -> RoundContext:
        """Fragment ``i``'s view of ``ctx``: its parameters (and buffers), its engine."""
        lo, hi = self.bounds[i]
        n = len(ctx.params)
        last = i == len(self.bounds) - 1
        tensors = ctx.params[lo:hi] + (list(ctx.engine.tensors[n:]) if last else [])
        engine = self.engines[i]
        if engine is None:  # its own copy engine: the fragment's tensors keep their storage
            engine = self.engines[i] = BucketEngine(tensors, self.cap)
        else:
            engine.refresh(tensors)  # the model moved, or a buffer was rebound
        names: Callable[[], list[str]] = lambda: (lambda all_: all_[lo:hi] + (all_[n:] if last else []))(ctx.names())
        return RoundContext(ctx.params[lo:hi], names, engine, ctx.group, ctx.size, ctx.step)

    def prepare(self, ctx: RoundContext) -> None:
        i = self.schedule.fragment_at(ctx.step)
        self._sub = self._context(ctx, i)
        self.inners[i].prepare(self._sub)

    def run(self, ctx: RoundContext, contributors: int, joined: bool) -> None:
        i, sub = self.schedule.fragment_at(ctx.step), self._sub
        assert sub is not None, "prepare() runs before run()"
        try:
            self.inners[i].run(sub, contributors, joined)
        finally:
            ctx.sent += sub.sent
            self._sub = None
        if getattr(self.inners[i], "apply_at", None) is not None:
            self._in_flight = i

    def wait(self) -> None:
        if self._in_flight is not None:
            self.inners[self._in_flight].wait()

    def land(self, params: list[torch.Tensor], names: list[str], engine: BucketEngine | None = None) -> None:
        i, self._in_flight = self._in_flight, None
        if i is not None:
            lo, hi = self.bounds[i]
            self.inners[i].land(params[lo:hi], names[lo:hi])

    def alone(self, params: list[torch.Tensor]) -> None:
        i = self.schedule.fragment_at(self.cursor.step)
        lo, hi = self.bounds[i]
        self.inners[i].alone(params[lo:hi])
        if getattr(self.inners[i], "apply_at", None) is not None:
            self._in_flight = i

    def restart(self, params: list[torch.Tensor], engine: BucketEngine | None = None) -> None:
        for (lo, hi), inner in zip(self.bounds, self.inners):
            inner.restart(params[lo:hi])

    # -- checkpoints: one sub-entry per fragment, under "fragments" ------------------------------

    def state(self, entry: dict[str, Any]) -> None:
        entry["fragments"] = []
        for inner in self.inners:
            sub: dict[str, Any] = {}
            inner.state(sub)
            entry["fragments"].append(sub)

    def _saved(self, entry: dict[str, Any] | None) -> list[Any]:
        saved = entry.get("fragments") if isinstance(entry, dict) else None
        if saved is None:
            return [None] * len(self.inners)  # saved without fragments: each restarts (with a warning)
        if not isinstance(saved, (list, tuple)) or len(saved) != len(self.inners) or not all(
                isinstance(s, dict) for s in saved):
            got = f"{len(saved)} fragment entries" if isinstance(saved, (list, tuple)) else repr(saved)[:80]
            raise ValueError(
                f"state_dict['local_sgd']['fragments'] must hold one dict per fragment ({len(self.inners)}), "
                f"got {got}; load a checkpoint saved with fragments={len(self.inners)}"
            )
        return list(saved)

    def check_state(self, entry: dict[str, Any] | None) -> None:
        for inner, saved in zip(self.inners, self._saved(entry)):
            inner.check_state(saved)

    def load_state(self, entry: dict[str, Any] | None, params: list[torch.Tensor]) -> None:
        self._in_flight = None
        for i, ((lo, hi), inner, saved) in enumerate(zip(self.bounds, self.inners, self._saved(entry))):
            inner.load_state(saved, params[lo:hi])
            if getattr(inner, "apply_at", None) is not None:
                self._in_flight = i
