"""Overlapped rounds (Streaming DiLoCo's delayed application): reduce while training goes on."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

from .._buckets import BucketEngine, foreach_copy, mean_op, plan_buckets
from .._flat import bucket_slices, regions
from .._outer import OuterState, flat_clone
from .._state import check_tensor_list
from .base import RoundContext
from .outer import GlobalCopyRound

__all__ = ["OverlapRound"]


class OverlapRound(GlobalCopyRound):
    """A two-phase outer round: launched at a scheduled step, landed ``overlap_steps`` later.

    :meth:`run` (the launch) snapshots ``global - local`` into persistent flat buffers laid
    out like the global copy (+1x parameters: the parameters keep training meanwhile) and
    starts one async all-reduce per bucket, each a slice of them. :meth:`wait` completes them and divides, leaving the mean
    pseudo-gradient in :attr:`views`; :meth:`land` steps the outer optimizer with it and
    mixes: ``p <- mix * p + (1 - mix) * global``. In a world of one the round is blocking.

    Args:
        outer: the global copy and the outer optimizer.
        params: the parameters (only their shapes, dtypes and devices are read).
        bucket_cap_bytes: the largest bucket.
        overlap_steps: local steps between the launch and the landing.
        mix: the weight kept of the local parameters when the round lands.
    """

    def __init__(self, outer: OuterState, params: Sequence[torch.Tensor], bucket_cap_bytes: int,
                 overlap_steps: int, mix: float) -> None:
        super().__init__(outer)
        self.overlap_steps = overlap_steps
        self.mix = mix
        self.views, self.flat = flat_clone(params)  # laid out as the global copy (values unused)
        # One all-reduce per bucket: a region's buckets tile its buffer in order.
        self.buckets = plan_buckets(params, bucket_cap_bytes)
        self._slices = bucket_slices(self.flat, regions(params), self.buckets)
        self._works: list[Any] = []
        self._divisor: int | None = None
        self.apply_at: int | None = None  # the step at which the pending result is applied

    def describe(self, step: int) -> str:
        return f"the overlapped round launched at step {step}"

    @torch.no_grad()
    def run(self, ctx: RoundContext, contributors: int, joined: bool) -> None:
        flats = self.outer.flats(ctx.engine)
        if joined:
            for buf in self.flat:
                buf.zero_()
        elif flats is not None:
            for g, p, out in zip(self.outer.flat, flats, self.flat):
                torch.sub(g, p, out=out)  # global - local, as a blocking round
        else:
            foreach_copy(self.views, self.outer.globals)
            torch._foreach_sub_(self.views, ctx.params)
        op, self._divisor = mean_op(ctx.group, contributors)
        self._works = [dist.all_reduce(buf, op, ctx.group, async_op=True) for buf in self._slices]
        ctx.sent += sum(buf.numel() * buf.element_size() for buf in self._slices)
        self.apply_at = ctx.step + self.overlap_steps

    @torch.no_grad()
    def wait(self) -> None:
        """Wait for the in-flight reduction (if any) and turn sums into means, once."""
        works, self._works = self._works, []
        for w in works:
            w.wait()
        if works and self._divisor not in (None, 1):
            torch._foreach_div_(self.flat, self._divisor)

    @torch.no_grad()
    def land(self, params: list[torch.Tensor], names: list[str], engine: BucketEngine | None = None) -> None:
        """Apply the round that was in flight (after :meth:`wait`); nothing if none is."""
        if self.apply_at is None:
            return
        self.outer.check_compatible(params, names)  # cast since the launch: raise before stepping
        self.outer.step(self.views)
        self.outer.mix_into(params, 1.0 - self.mix, engine)  # keep part of the local progress
        self.apply_at = None

    def state(self, entry: dict[str, Any]) -> None:
        super().state(entry)
        if self.apply_at is not None:
            self.wait()  # local: the collectives are already matched on every rank
            entry["in_flight"] = {"apply_at": self.apply_at, "mean_delta": list(self.views)}

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
        check_tensor_list(in_flight.get("mean_delta"), self.views, "'in_flight']['mean_delta'",
                          f"one tensor per parameter ({len(self.views)}, same shapes); pass a state dict "
                          "saved by a LocalSGDOptimizer with the same model and overlap_steps")

    def load_state(self, entry: dict[str, Any] | None, params: list[torch.Tensor]) -> None:
        super().load_state(entry, params)  # (no decorator here: the warning's stacklevel counts frames)
        in_flight = (entry.get("in_flight") if isinstance(entry, dict) else None) or {}
        self._works = []
        self.apply_at = in_flight.get("apply_at")
        if self.apply_at is not None:
            with torch.no_grad():
                foreach_copy(self.views, [t.to(v.device, v.dtype) for t, v in zip(in_flight["mean_delta"], self.views)])
