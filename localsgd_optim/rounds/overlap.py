"""Overlapped rounds (Streaming DiLoCo's delayed application): reduce while training goes on."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .._buckets import InFlight, foreach_copy
from .._dist import LocalSGDError, PendingAgreement
from .._flat import rebase
from .._outer import OuterState
from .._state import check_tensor_list
from .base import RoundContext
from .outer import GlobalCopyRound

__all__ = ["OverlapRound"]


class OverlapRound(GlobalCopyRound):
    """A two-phase outer round: launched at a scheduled step, landed when the cursor says so.

    :meth:`run` (the launch) writes ``global - local`` into a persistent in-flight copy laid
    out like the global copy (+1x parameters: the parameters keep training meanwhile) and
    starts the engine's asynchronous mean over its buckets. The averaged module buffers (values,
    not deltas, and small) are averaged right away, blocking. :meth:`wait` completes the mean;
    :meth:`land` steps the outer optimizer with it and mixes:
    ``p <- mix * p + (1 - mix) * global``. In a world of one the round is blocking.

    ``asynchronous`` (time-budgeted replicas): :meth:`launch` replaces :meth:`run`. The control
    collective goes out unwaited with the data, in buckets laid out when the ranks last agreed on
    the layout; :meth:`wait` reads its verdict. Module buffers are refused there.

    Args:
        outer: the global copy and the outer optimizer.
        mix: the weight kept of the local parameters when the round lands.
    """

    def __init__(self, outer: OuterState, mix: float, asynchronous: bool = False) -> None:
        super().__init__(outer)
        self.mix = mix
        #: launched without waiting for the other ranks (time-budgeted replicas): the control
        #: collective goes out with the data, and its verdict is read when the round lands
        self.asynchronous = asynchronous
        self._agreement: PendingAgreement | None = None
        # (asynchronous) the in-flight copy's buckets, laid out when every rank agreed on the layout
        # (binding, warmup end): a round always goes out in them, so the ranks' collectives match
        self._slices: list[torch.Tensor] | None = None
        self._digest, self._group = 0, None
        self.deltas: list[torch.Tensor] = []  # the in-flight copy, laid out like the global copy
        self.views: list[torch.Tensor] = []  # its per-parameter views: the mean pseudo-gradients
        self._key: tuple | None = None
        self._flight: InFlight | None = None
        self.lands_at: int | None = None  # the cursor's landing step of the pending round (for checkpoints)

    @property
    def pending(self) -> bool:
        """Whether a launched round has not landed yet."""
        return self.lands_at is not None

    def describe(self, step: int) -> str:
        return f"the overlapped round launched at step {step}"

    def breaks(self, n_params: int) -> list[int]:
        return [n_params]  # the module buffers are averaged apart, blocking: buckets of their own

    def prepare(self, ctx: RoundContext) -> None:
        super().prepare(ctx)
        if self.asynchronous and self._slices is not None and ctx.digest != self._digest:
            raise LocalSGDError(
                "LocalSGDOptimizer: the parameters changed on this rank (frozen, cast, moved or added) while "
                "asynchronous rounds run: a round goes out before the ranks compare layouts, so it keeps the "
                "layout they agreed on at binding. Change the model before the optimizer binds, or use "
                "blocking rounds (overlap_steps=0)")
        self._in_flight_copy(ctx)

    def _in_flight_copy(self, ctx: RoundContext) -> list[torch.Tensor]:
        flats = self.flats(ctx)
        if self._key != self.outer.key:
            self.deltas = [torch.empty_like(f) for f in flats]
            self.views = rebase(ctx.engine.views(ctx.lo, ctx.hi), flats, self.deltas)
            self._key = self.outer.key
            if self.asynchronous:
                self._slices = ctx.engine.bucket_slices(self.deltas, ctx.lo, ctx.hi)
                self._digest, self._group = ctx.digest, ctx.group
        return flats

    def restart(self, params: list[torch.Tensor], ctx: RoundContext | None = None) -> None:
        super().restart(params, ctx)
        if self.asynchronous and ctx is not None:  # laid out now, while every rank agrees on the layout
            self._in_flight_copy(ctx)

    @torch.no_grad()
    def run(self, ctx: RoundContext, contributors: int, joined: bool) -> None:
        if ctx.weight is not None:  # (decided alike on every rank)
            raise LocalSGDError("LocalSGDOptimizer: step(tokens=...) with different totals per rank weights the "
                                "mean, which overlap_steps does not support yet: drop tokens= or overlap_steps")
        flats, engine = self._in_flight_copy(ctx), ctx.engine
        if ctx.end > ctx.hi and contributors:  # module buffers: averaged now, blocking, before the
            ctx.sent += engine.all_reduce_mean(ctx.group, ctx.size, contributors, send_zeros=joined,  # deltas
                                               lo=ctx.hi, hi=ctx.end)  # go on the wire (not queued behind them)
        if joined:
            for d in self.deltas:
                d.zero_()
        else:
            engine.stage_in(ctx.lo, ctx.hi)
            self.outer.to_deltas(flats, out=self.deltas)  # global - local, as a blocking round
        self._flight = engine.start_mean(ctx.group, ctx.size, contributors, self.deltas, ctx.lo, ctx.hi)
        ctx.sent += self._flight.sent
        self.lands_at = ctx.lands_at

    @torch.no_grad()
    def launch(self, ctx: RoundContext | None, agreement: PendingAgreement, joined: bool, weight: int,
               lands_at: int | None) -> None:
        """Phase one of an asynchronous round: the control collective (``agreement``) is on the wire
        already; put ``weight x (global - local)`` on it too (zeros if ``joined`` or ``weight`` is 0;
        ``weight`` -1: not weighted) and return at once. :meth:`wait` reads the verdict.

        The data always goes out in the buckets laid out when the ranks last agreed on the layout.
        A rank that failed to prepare (its row says so) sends zeros in them, so every rank's
        collectives still match and the verdict raises on every rank when the round lands."""
        self._agreement = agreement
        if self._slices is None and ctx is not None and not agreement.failed:
            self._in_flight_copy(ctx)  # (not laid out at binding: a single-process restart)
        if self._slices is None:  # nothing this rank could send in: its own error, now
            self._agreement = None
            agreement.finish()
            raise LocalSGDError("LocalSGDOptimizer: the asynchronous round could not be prepared")
        if agreement.failed or ctx is None or joined or weight == 0:
            for d in self.deltas:
                d.zero_()
        else:
            flats = self._in_flight_copy(ctx)
            if ctx.end > ctx.hi:  # (refused by the configuration: module buffers would need a blocking mean)
                raise LocalSGDError("LocalSGDOptimizer: asynchronous rounds do not average module buffers")
            ctx.engine.stage_in(ctx.lo, ctx.hi)
            self.outer.to_deltas(flats, out=self.deltas)
            if weight > 0:
                torch._foreach_mul_(self.deltas, float(weight))
        self._flight = InFlight.start(self._group, dist.ReduceOp.SUM, self._slices, self.deltas, None)
        if ctx is not None:
            ctx.sent += self._flight.sent
        self.lands_at = lands_at

    def wait(self) -> None:
        """Complete the in-flight mean (if any); an asynchronous round first reads the control
        collective's verdict, and a round that failed it (or where nobody sent work) is dropped."""
        flight, self._flight = self._flight, None
        agreement, self._agreement = self._agreement, None
        if agreement is not None:
            try:
                share = agreement.finish(prescaled=True)
            except BaseException:
                if flight is not None:  # the data collectives were matched on every rank: let them end
                    flight.divisor = None
                    flight.wait()
                self.lands_at = None  # dropped on every rank alike: every replica is left as it was
                raise
            if flight is not None:
                flight.divisor = share.divisor or None
            if not share.divisor:  # every rank sent zeros (joined, or no work): nothing to apply
                self.lands_at = None
        if flight is not None:
            flight.wait()

    @torch.no_grad()
    def land(self, ctx: RoundContext | None) -> None:
        """Apply the round that was in flight (after :meth:`wait`); nothing if none is."""
        if not self.pending:
            return
        if ctx is None:  # (a single process runs blocking rounds: nothing is ever in flight there)
            return
        self.outer.check_compatible(ctx.params, ctx.names())  # cast since the launch: raise before stepping
        flats = self.flats(ctx)
        self.outer.step(self.views)
        ctx.engine.stage_in(ctx.lo, ctx.hi)
        self.outer.mix_into(flats, 1.0 - self.mix)  # keep part of the local progress
        ctx.engine.stage_out(ctx.lo, ctx.hi)
        self.lands_at = None

    def state(self, entry: dict[str, Any]) -> None:
        super().state(entry)
        if self.pending:
            self.wait()  # local: the collectives are already matched on every rank
        if self.pending:  # (an asynchronous round where nobody sent work is dropped by its wait)
            entry["in_flight"] = {"apply_at": self.lands_at, "mean_delta": list(self.views)}

    def check_state(self, entry: dict[str, Any] | None) -> None:
        super().check_state(entry)
        in_flight = entry.get("in_flight") if isinstance(entry, dict) else None
        if in_flight is None:
            return
        apply_at = in_flight.get("apply_at") if isinstance(in_flight, dict) else None
        if isinstance(apply_at, bool) or not isinstance(apply_at, int) or apply_at < 1:
            raise ValueError(
                "state_dict['local_sgd']['in_flight'] must be a dict with 'apply_at' (an integer >= 1) and "
                f"'mean_delta', got {in_flight!r:.200}; pass a state dict saved by a LocalSGDOptimizer "
                "with overlap_steps"
            )
        check_tensor_list(in_flight.get("mean_delta"), self.outer.globals, "'in_flight']['mean_delta'",
                          f"one tensor per parameter ({len(self.outer.globals)}, same shapes); pass a state dict "
                          "saved by a LocalSGDOptimizer with the same model and overlap_steps")

    def load_state(self, entry: dict[str, Any] | None, params: list[torch.Tensor]) -> None:
        super().load_state(entry, params)  # (no decorator here: the warning's stacklevel counts frames)
        in_flight = (entry.get("in_flight") if isinstance(entry, dict) else None) or {}
        self.wait()  # a round still on the wire would go on writing into the loaded mean
        self.lands_at = in_flight.get("apply_at")
        if self.lands_at is not None:
            if not self.views:  # not bound yet: laid out like the global copy
                self.deltas = [torch.empty_like(f) for f in self.outer.flat]
                self.views = rebase(self.outer.globals, self.outer.flat, self.deltas)
                self._key = self.outer.key
            with torch.no_grad():
                foreach_copy(self.views, [t.to(v.device, v.dtype) for t, v in zip(in_flight["mean_delta"], self.views)])
