"""Overlapped rounds (Streaming DiLoCo's delayed application): reduce while training goes on."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

from ._buckets import _foreach_copy, _supports_avg, plan_buckets

__all__ = ["OverlappedRound"]


class OverlappedRound:
    """Pseudo-gradients reduced asynchronously while local steps continue, applied later.

    :meth:`launch` snapshots ``global - local`` into persistent flat buffers (one per
    bucket, +1x parameters: the parameters keep training meanwhile) and starts one
    async all-reduce per bucket. :meth:`finish` waits and divides, leaving the mean
    pseudo-gradient in :attr:`views`, shaped like the parameters.
    """

    def __init__(self, params: Sequence[torch.Tensor], bucket_cap_bytes: int) -> None:
        self.buckets = plan_buckets(params, bucket_cap_bytes)
        self.buffers = [torch.empty(b.numel, dtype=b.dtype, device=b.device) for b in self.buckets]
        self.views: list[torch.Tensor] = [torch.empty(0)] * len(params)
        for b, buf in zip(self.buckets, self.buffers):
            for i, off in zip(b.indices, b.offsets):
                self.views[i] = buf[off:off + params[i].numel()].view_as(params[i])
        self._works: list[Any] = []
        self._divisor = 1
        self.apply_at: int | None = None  # the step at which the pending result is applied

    @torch.no_grad()
    def launch(self, globals_: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
               group: dist.ProcessGroup | None, contributors: int, send_zeros: bool, apply_at: int) -> None:
        if send_zeros:
            for buf in self.buffers:
                buf.zero_()
        else:
            _foreach_copy(self.views, list(globals_))
            torch._foreach_sub_(self.views, list(params))  # global - local, as a blocking round
        avg = contributors == dist.get_world_size(group) and _supports_avg(group)
        op = dist.ReduceOp.AVG if avg else dist.ReduceOp.SUM
        self._works = [dist.all_reduce(buf, op, group, async_op=True) for buf in self.buffers]
        self._divisor = 1 if avg else contributors
        self.apply_at = apply_at

    @torch.no_grad()
    def finish(self) -> None:
        """Wait for the in-flight reduction (if any) and turn sums into means, once."""
        works, self._works = self._works, []
        for w in works:
            w.wait()
        if works and self._divisor != 1:
            for buf in self.buffers:
                buf.div_(self._divisor)

    def state_dict(self) -> dict[str, Any]:
        self.finish()  # local: the collectives are already matched on every rank
        return {"apply_at": self.apply_at, "mean_delta": [v for v in self.views]}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._works = []
        self.apply_at = state.get("apply_at")
        if self.apply_at is not None:
            _foreach_copy(self.views, [t.to(v.device, v.dtype) for t, v in zip(state["mean_delta"], self.views)])
