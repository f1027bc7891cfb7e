"""The protocol every round strategy follows: prepare, run, and its share of the checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from .._buckets import BucketEngine, foreach_copy
from .._dist import RoundKind, all_gather_into
from .._flat import Layout, rebase
from .._state import check_tensor_list
from ._kernel import pointer

__all__ = ["RoundContext", "Reducer", "ErrorFeedback", "Round"]


@dataclass
class RoundContext:
    """What one round works on; made afresh for each round.

    Attributes:
        params: the parameters, in the wrapper's order.
        names: returns readable names of ``params`` (then of averaged buffers), for errors.
        engine: the bucket engine over the parameters and averaged buffers.
        group: the ranks of this round (the local group for hierarchical rounds).
        size: how many ranks ``group`` has.
        step: the step count at this round.
        lo: the first of the round's parameters in the engine's tensor list.
        hi: one past its last parameter.
        end: one past its last tensor: ``hi``, or past the averaged module buffers if the round
            takes them (the whole model, or the last fragment).
        lands_at: the step at which the cursor lands an overlapped round launched now.
        sent: bytes this rank handed to the round's data collectives (strategies add to it).
        weight: this rank's weight when the round's mean is weighted (``step(tokens=)`` with
            different totals): what it sends is multiplied by it, and ``contributors`` is the total.
        digest: the binding's layout digest now (what the control collective compares).
    """

    params: list[torch.Tensor]
    names: Callable[[], list[str]]
    engine: BucketEngine
    group: dist.ProcessGroup | None
    size: int
    step: int
    lo: int = 0
    hi: int = 0
    end: int = 0
    lands_at: int | None = None
    sent: int = 0
    weight: int | None = None
    digest: int = 0

    def part(self, lo: int, hi: int, end: int) -> "RoundContext":
        """The context of a fragment: parameters ``[lo, hi)``, tensors up to ``end``."""
        names = self.names

        def part_names() -> list[str]:  # its parameters', then its buffers' (names line up with the engine)
            every = names()
            return every[lo:hi] + every[hi:end]

        return RoundContext(self.params[lo:hi], part_names, self.engine, self.group, self.size, self.step,
                            lo, hi, end, self.lands_at, weight=self.weight)


class Reducer:
    """Replaces tensors by their mean across ranks, in place: plain, cast for the wire, or int8.

    :meth:`prepare` allocates (before the round's control collective, so nothing can fail
    locally once data moves); :meth:`reduce` runs the collectives over ``contributors``
    ranks (ranks that joined send zeros). The default reduces every tensor of the engine.
    """

    def prepare(self, ctx: RoundContext) -> None:
        ctx.engine.prepare()

    def reduce(self, ctx: RoundContext, contributors: int, joined: bool,
               buffers: list[torch.Tensor] | None = None) -> None:
        """Average tensors ``[ctx.lo, ctx.end)`` (or ``buffers``, laid out like their flat slices)."""
        ctx.sent += ctx.engine.all_reduce_mean(ctx.group, ctx.size, contributors, send_zeros=joined,
                                               lo=ctx.lo, hi=ctx.end, buffers=buffers, weight=ctx.weight)

    # A reducer with state (int8's error feedback) saves it in the Local SGD entry.
    def state(self, entry: dict[str, Any]) -> None:
        pass

    def check_state(self, entry: dict[str, Any]) -> None:
        pass

    def load_state(self, entry: dict[str, Any] | None) -> None:
        pass


class ErrorFeedback(Reducer):
    """A reducer that keeps a per-rank fp32 residual of what it did not send (int8, top-k, low-bit).

    A weighted mean (``RoundContext.weight`` = ``w``, this rank's) is weighted before encoding: the rank
    encodes ``w * v`` (``v = delta + feedback * residual``), the decoded sum is divided by the total
    weight, and the residual keeps ``(w * v - sent) / w``: in the rank's own units, so a later round
    with another weight (or none) adds it to its delta as is. A rank with weight 0 counts as joined:
    it sends zeros and keeps its residual as it was (its delta is not added: the round's mean
    replaces its parameters, as in a plain round).

    The residuals are laid out like the parameters' flat slices (re-laid out, values kept, if the
    engine lays them out otherwise), so each bucket's residual is a slice of :attr:`flats`. They
    are saved in the Local SGD entry under :attr:`key`; a checkpoint without them restarts the
    feedback from zero.

    Args:
        tensors: the tensors averaged in place (the pseudo-gradients), fixed order.
        flat_params: the engine's layout setting.
        key: the entry's key for the residuals.
        hint: how to fix a checkpoint whose residuals do not fit (the error's last words).
    """

    def __init__(self, tensors: Sequence[torch.Tensor], flat_params: bool, key: str, hint: str) -> None:
        layout = Layout(tensors, [flat_params] * len(tensors))
        self.flats = [torch.zeros(r.numel, dtype=torch.float32, device=r.device) for r in layout.regions]
        self.residuals: list[torch.Tensor] = layout.views(self.flats)
        self._layout_key: tuple | None = layout.key(0, len(tensors))
        self.key, self._hint = key, hint
        self._lib: Any = None  # the fused C kernels (CPU, a compiler found: ``_kernel.codec``), or None

    def prepare(self, ctx: RoundContext) -> None:
        """Allocate the flat layout and lay the residuals out like the engine's slices."""
        ctx.engine.prepare(flat=True)
        key, flats = ctx.engine.flats(ctx.lo, ctx.hi)
        if key != self._layout_key:
            new = [torch.zeros(f.numel(), dtype=torch.float32, device=f.device) for f in flats]
            views = rebase(ctx.engine.views(ctx.lo, ctx.hi), flats, new)
            with torch.no_grad():
                foreach_copy(views, self.residuals)
            self.residuals, self.flats, self._layout_key = views, new, key

    @staticmethod
    def _into_residual(delta: torch.Tensor, residual: torch.Tensor, feedback: float, spare: torch.Tensor,
                       weight: int | None = None) -> torch.Tensor:
        """``v = delta + feedback * residual`` built in the fp32 residual (``delta`` rounded to fp32 first,
        in ``spare``, when it is another dtype), times ``weight`` when the mean is weighted (then what is
        encoded is ``weight * v``: :meth:`_out_of_weight` brings what is left back); returns the residual."""
        if delta.dtype != residual.dtype:
            delta = spare[:delta.numel()].copy_(delta)
        v = torch.add(delta, residual, alpha=feedback, out=residual)
        return v if weight is None else v.mul_(weight)

    def _build(self, v: torch.Tensor, delta: torch.Tensor | None, weight: int | None, joined: bool,
               feedback: float = 1.0) -> tuple[int | None, float]:
        """``v = delta + feedback * v`` (times ``weight``) in place, unless ``joined`` or there is no ``delta``;
        or, where the C kernels can build it in their first pass (fp32, feedback 1: the same add and
        multiply), the (``delta``'s address, weight or 0) they take for it. (A ``delta`` of another dtype
        is rounded to fp32 in the subclass's ``_buffers["total"]``.)"""
        if delta is None or joined:
            return None, 0.0
        if self._lib is not None and delta.dtype == torch.float32 and feedback == 1.0 \
                and (weight is None or weight > 0):
            return pointer(delta), float(weight or 0.0)
        self._into_residual(delta, v, feedback, self._buffers["total"], weight)
        return None, 0.0

    @staticmethod
    def _out_of_weight(residual: torch.Tensor, weight: int | None) -> None:
        """A weighted round's error feedback: the residual ``w * v - sent`` (what encoding ``w * v`` left)
        divided by ``w``, so it stays in this rank's own, unweighted units: ``(w * v - sent) / w``."""
        if weight is not None:
            residual.div_(weight)

    def _gather(self, out: torch.Tensor, mine: torch.Tensor, group: Any, async_op: bool = False) -> Any:
        """Every rank's payload into ``out``, in rank order (the bench's compute floor replaces it)."""
        return all_gather_into(out, mine, group, async_op=async_op)

    def state(self, entry: dict[str, Any]) -> None:
        entry[self.key] = list(self.residuals)

    def check_state(self, entry: dict[str, Any] | None) -> None:
        residuals = entry.get(self.key) if isinstance(entry, dict) else None
        if residuals is not None:
            check_tensor_list(residuals, self.residuals, f"'{self.key}'",
                              f"one tensor per parameter, same shapes; {self._hint}")

    @torch.no_grad()
    def load_state(self, entry: dict[str, Any] | None) -> None:
        residuals = entry.get(self.key) if isinstance(entry, dict) else None
        if residuals is None:  # saved without them: error feedback starts from zero
            for r in self.residuals:
                r.zero_()
            return
        for mine, saved in zip(self.residuals, residuals):
            mine.copy_(saved)


class Round:
    """One strategy for a round. The optimizer drives every round the same way:

    1. :meth:`prepare`: local work only (allocate, check compatibility); it may raise, and the
       error is announced in the control collective, so every rank raises;
    2. the control collective (same step? same layout? NaN? who joined?);
    3. :meth:`run`: the collectives, in place; on a failure it leaves the parameters as
       they were before the data phase where it can (a global copy), then re-raises.

    In a single process :meth:`alone` runs instead. A round's state goes into the Local SGD
    entry of the checkpoint through :meth:`state`; :meth:`check_state` validates an entry
    before anything is loaded, and :meth:`load_state` loads it.
    """

    #: what the control collective says this round is
    kind: RoundKind = RoundKind.SCHEDULED
    #: runs over the hierarchical local group instead of the whole group
    local: bool = False
    #: keeps per-parameter state (a global copy), so parameter groups cannot be added later
    per_parameter_state: bool = False
    #: reducers that also run, over the same ranks, after the round's own (the optimizer state)
    riders: tuple[Reducer, ...] = ()
    #: launched by :meth:`launch` with its control collective, both unwaited (time-budgeted replicas
    #: with ``overlap_steps``): :meth:`wait` reads the verdict when the round lands
    asynchronous: bool = False

    def describe(self, step: int) -> str:
        return f"{self.kind.description} at step {step}"

    def breaks(self, n_params: int) -> list[int]:
        """Tensor indices no bucket of the engine may straddle (``n_params``: where the buffers start)."""
        return []

    def outer_optimizer(self) -> torch.optim.Optimizer | None:
        """The outer optimizer, if any: its type and defaults go into the cross-rank settings check."""
        return None

    def prepare(self, ctx: RoundContext) -> None:
        raise NotImplementedError

    def run(self, ctx: RoundContext, contributors: int, joined: bool) -> None:
        raise NotImplementedError

    def launch(self, ctx: RoundContext | None, agreement: Any, joined: bool, weight: int, lands_at: int | None) -> None:
        """Phase one of an :attr:`asynchronous` round (``ctx``: ``None`` if this rank failed to prepare),
        landing at step ``lands_at``."""
        raise NotImplementedError

    def wait(self) -> None:
        """Phase two of a delayed round, first half: complete its collectives (the default has none)."""

    def land(self, ctx: RoundContext | None) -> None:
        """Phase two of a delayed round, second half: apply what :meth:`wait` completed (``ctx``:
        ``None`` in a single process)."""

    def alone(self, params: list[torch.Tensor]) -> None:
        """The round in a world of one: nothing to average."""

    def restart(self, params: list[torch.Tensor], ctx: RoundContext | None = None) -> None:
        """The replicas were just made equal (binding, end of warmup): a global copy restarts here."""

    def state(self, entry: dict[str, Any]) -> None:
        pass

    def check_state(self, entry: dict[str, Any] | None) -> None:
        pass

    def load_state(self, entry: dict[str, Any] | None, params: list[torch.Tensor]) -> None:
        pass
