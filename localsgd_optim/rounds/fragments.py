"""Streaming rounds: the model in contiguous fragments, one fragment synced per round."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .._outer import check_trainable_count
from .._schedule import Cursor
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
    parameters, so an outer optimizer's state is per fragment). It runs on the one engine: the
    engine's buckets never straddle a fragment boundary (its ``breaks``), so a fragment is a run
    of whole buckets and a slice of each flat buffer, reduced where it lives. Which fragment a
    round syncs is the cursor's (:meth:`Cursor.fragment`: a function of the step, or with
    ``round_every_s`` of the round count). At most one
    overlapped fragment is in flight.

    Args:
        bounds: each fragment's ``[lo, hi)`` range of the parameters.
        inners: each fragment's round.
        cursor: the optimizer's cursor: which fragment the current round syncs.
    """

    def __init__(self, bounds: list[tuple[int, int]], inners: list[Round], cursor: Cursor) -> None:
        self.bounds, self.inners = bounds, inners
        self.cursor = cursor
        self.per_parameter_state = True  # the fragments' bounds are indices into the parameters
        self._in_flight: int | None = None  # the overlapped fragment not landed yet

    def describe(self, step: int) -> str:
        return f"fragment {self.cursor.fragment()}'s round at step {step}"

    def outer_optimizer(self) -> torch.optim.Optimizer | None:
        return self.inners[0].outer_optimizer()

    def breaks(self, n_params: int) -> list[int]:
        return [lo for lo, _ in self.bounds[1:]] + self.inners[-1].breaks(n_params)

    def _part(self, ctx: RoundContext, i: int) -> RoundContext:
        """Fragment ``i``'s view of ``ctx``: its parameters, and the buffers with the last."""
        lo, hi = self.bounds[i]
        return ctx.part(lo, hi, ctx.end if i == len(self.bounds) - 1 else hi)

    def prepare(self, ctx: RoundContext) -> None:
        check_trainable_count(self.bounds[-1][1], len(ctx.params))  # the bounds index the parameters
        i = self.cursor.fragment()
        self.inners[i].prepare(self._part(ctx, i))

    def run(self, ctx: RoundContext, contributors: int, joined: bool) -> None:
        i = self.cursor.fragment()
        sub = self._part(ctx, i)
        try:
            self.inners[i].run(sub, contributors, joined)
        finally:
            ctx.sent += sub.sent
        if getattr(self.inners[i], "pending", False):
            self._in_flight = i

    def wait(self) -> None:
        if self._in_flight is not None:
            self.inners[self._in_flight].wait()

    def land(self, ctx: RoundContext | None) -> None:
        i, self._in_flight = self._in_flight, None
        if i is not None:
            self.inners[i].land(self._part(ctx, i) if ctx is not None else None)

    def alone(self, params: list[torch.Tensor]) -> None:
        i = self.cursor.fragment()
        lo, hi = self.bounds[i]
        self.inners[i].alone(params[lo:hi])

    def restart(self, params: list[torch.Tensor], ctx: RoundContext | None = None) -> None:
        for i, ((lo, hi), inner) in enumerate(zip(self.bounds, self.inners)):
            inner.restart(params[lo:hi], self._part(ctx, i) if ctx is not None else None)

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
        self.wait()  # a fragment still on the wire would go on writing into the loaded mean
        self._in_flight = None
        for i, ((lo, hi), inner, saved) in enumerate(zip(self.bounds, self.inners, self._saved(entry))):
            inner.load_state(saved, params[lo:hi])
            if getattr(inner, "pending", False):
                self._in_flight = i
