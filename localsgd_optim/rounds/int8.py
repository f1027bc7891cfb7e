"""int8 compression of pseudo-gradients with error feedback: bucketed all-gathers, summed locally."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

from ._kernel import codec, pointer
from .base import ErrorFeedback, RoundContext

__all__ = ["Int8Reducer"]


class Int8Reducer(ErrorFeedback):
    """Average tensors across ranks sending 1 byte per element, with error feedback.

    Each tensor ``v = x + residual`` is quantized with its own scale ``max|v| / 127`` (a
    per-tensor scale: more accurate than one per bucket, 4 bytes per tensor on the wire)
    and the residual ``v - codes * scale`` is kept for the next round (error feedback:
    nothing is lost, only delayed). Per bucket, the codes and the scales are all-gathered:
    two collectives per bucket, not per tensor, and every other step is one flat or
    ``_foreach`` op per bucket. They are gathered, not summed: an int8 sum
    would overflow, and narrowing the range for W ranks would cost precision. Every rank
    sums the dequantized codes in rank order, so all ranks get bit-identical results.
    Wire bytes per rank: ``(W - 1) * n`` against ``8 n (W - 1) / W`` for an fp32 ring
    all-reduce, a gain below 8 ranks. Every buffer is allocated by :meth:`prepare`, before
    the round's control gather, so nothing allocates once collectives have started.

    Buckets are the engine's (the same plan as every other round), the residuals laid out
    like the parameters' flat slices, so each bucket's residual is a slice too. On the CPU the
    encode and each rank's decode are one C function each (``_codec.c``): the same operations,
    element by element, as the eager path (:meth:`_encode` and the loop in :meth:`_reduce_bucket`).

    Args:
        tensors: the tensors averaged in place (the pseudo-gradients), fixed order.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], flat_params: bool = True) -> None:
        super().__init__(tensors, flat_params, "int8_residuals",
                         "pass a state dict saved by a LocalSGDOptimizer with compression='int8'")
        self._buffers: dict[str, torch.Tensor] = {}
        self._shape: tuple[int, ...] = ()
        self._views: dict[tuple, tuple] = {}  # per bucket layout: its runs and their views of the scratch

    def prepare(self, ctx: RoundContext) -> None:
        super().prepare(ctx)
        buckets = [ctx.engine.buckets[pos] for pos in ctx.engine.bucket_range(ctx.lo, ctx.hi)]
        self._allocate(ctx.size, buckets)

    def _allocate(self, world: int, buckets: list) -> None:
        numel = max((b.numel for b in buckets), default=0)
        count = max((len(b.indices) for b in buckets), default=0)
        # a mean accumulates in fp32: in the bucket itself, or (other dtypes) in a buffer of its own
        total = max((b.numel for b in buckets if b.dtype != torch.float32), default=0)
        device = buckets[0].device if buckets else torch.device("cpu")
        self._lib = codec(device)  # the fused C kernels (CPU), or None: the eager path
        if self._shape == (world, numel, count, total):
            return
        self._buffers = {
            "codes": torch.empty(numel, dtype=torch.int8, device=device),
            "scales": torch.empty(count, dtype=torch.float32, device=device),
            "all_codes": torch.empty(world * numel, dtype=torch.int8, device=device),
            "all_scales": torch.empty(world * count, dtype=torch.float32, device=device),
            "q": torch.empty(numel, dtype=torch.float32, device=device),
            "total": torch.empty(total, dtype=torch.float32, device=device),
        }
        self._views.clear()
        self._shape = (world, numel, count, total)

    @torch.no_grad()
    def reduce(self, ctx: RoundContext, contributors: int, joined: bool,
               buffers: list[torch.Tensor] | None = None) -> None:
        """Quantize, all-gather and dequantize each bucket of ``buffers`` (the deltas' flat slices).

        A fixed number of ops per bucket: each tensor is a contiguous run of its bucket (a max
        and a scale do not care about the order of its elements). The per-tensor scales come to
        the host once per bucket and rank (a handful of floats), so each scaling is one
        ``_foreach`` op with a scalar per tensor.
        """
        assert buffers is not None, "int8 reduces the flat layout"
        engine, group = ctx.engine, ctx.group
        world = dist.get_world_size(group)
        positions = engine.bucket_range(ctx.lo, ctx.hi)
        slices = engine.bucket_slices(buffers, ctx.lo, ctx.hi)
        residuals = engine.bucket_slices(self.flats, ctx.lo, ctx.hi)
        for pos, target, residual in zip(positions, slices, residuals):
            bucket = engine.buckets[pos]
            ctx.sent += self._reduce_bucket(bucket, target, residual, group, world, contributors, joined,
                                            ctx.weight)

    def _runs(self, bucket: Any) -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
        """The bucket's tensors as (offset, size) runs (a (tensors, 2) int64 tensor: the C kernels' layout),
        their views of the scratch and the non-empty ones (made once per bucket layout)."""
        key = (bucket.numel, tuple(bucket.offsets))
        found = self._views.get(key)
        if found is None:
            n, m = bucket.numel, len(bucket.offsets)
            runs = [(off, (bucket.offsets[j + 1] if j + 1 < m else n) - off) for j, off in enumerate(bucket.offsets)]
            q = self._buffers["q"]
            found = self._views[key] = (torch.tensor(runs, dtype=torch.int64).view(m, 2).T.contiguous(),
                                        [q[a:a + size] for a, size in runs],
                                        [j for j, (_, size) in enumerate(runs) if size])
        return found

    def _reduce_bucket(self, bucket: Any, target: torch.Tensor, residual: torch.Tensor, group: Any, world: int,
                       contributors: int, joined: bool, weight: int | None = None) -> int:
        """One bucket in one scratch (``q``) besides the payloads: ``v`` is built in the residual, the mean
        in the bucket (a weighted mean: ``weight * v`` is encoded, see :class:`ErrorFeedback`)."""
        buf = self._buffers
        n, m = bucket.numel, len(bucket.indices)
        codes, scales, q = buf["codes"][:n], buf["scales"][:m], buf["q"][:n]
        runs, q_views, nonempty = self._runs(bucket)
        joined = joined or not n  # (an empty bucket: nothing to build, send or keep)
        if self._lib is not None:  # the same operations as below, element by element, in C
            self._lib.lsgd_int8_encode(pointer(residual), *self._build(residual, target, weight, joined), m,
                                       pointer(runs[0]), pointer(runs[1]), joined, pointer(codes), pointer(scales))
            if not joined:
                self._out_of_weight(residual, weight)
        else:
            self._encode(target, residual, codes, scales, q, q_views, nonempty, joined, weight)
        all_codes, all_scales = buf["all_codes"][:world * n], buf["all_scales"][:world * m]
        works = [self._gather(all_codes, codes, group, async_op=True),
                 self._gather(all_scales, scales, group, async_op=True)]
        for w in works:
            w.wait()
        all_codes = all_codes.view(world, n)
        total = (target if target.dtype == torch.float32 else buf["total"][:n]).zero_()
        if self._lib is not None:  # rank order: the same sum on every rank; the last rank's decode divides
            all_scales = all_scales.view(world, m)
            for r in range(world):
                last = float(contributors if r == world - 1 else 0)
                self._lib.lsgd_int8_decode(pointer(all_codes[r]), pointer(all_scales[r]), m, pointer(runs[0]),
                                           pointer(runs[1]), pointer(total), last)
        else:
            per_rank = all_scales.view(world, m).tolist()
            for r in range(world):  # rank order: the same sum on every rank
                q.copy_(all_codes[r])
                torch._foreach_mul_(q_views, per_rank[r])
                total.add_(q)
            total.div_(contributors)
        if total is not target:
            target.copy_(total)
        return codes.numel() * codes.element_size() + scales.numel() * scales.element_size()

    def _encode(self, target: torch.Tensor, residual: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                q: torch.Tensor, q_views: list[torch.Tensor], nonempty: list[int], joined: bool,
                weight: int | None) -> None:
        """The eager path: ``v`` in the residual, per-tensor scales, codes, ``v - codes * scale`` kept."""
        m = scales.numel()
        if joined:  # a rank that joined sends zeros and keeps its residual
            v = q.zero_()
        else:
            v = self._into_residual(target, residual, 1.0, self._buffers["total"], weight)  # v = x + residual
        # per-tensor scale max|v| / 127 (an empty tensor's is 0 before the clamp)
        torch.abs(v, out=q)
        if len(nonempty) == m:
            scales.copy_(torch.stack(torch._foreach_max(q_views)))
        else:
            scales.zero_()
            if nonempty:
                scales[nonempty] = torch.stack(torch._foreach_max([q_views[j] for j in nonempty]))
        scales.clamp_min_(torch.finfo(torch.float32).tiny).div_(127)
        mine = scales.tolist()
        q.copy_(v)
        torch._foreach_div_(q_views, mine)
        q.round_().clamp_(-127, 127)
        codes.copy_(q)
        if not joined:
            torch._foreach_mul_(q_views, mine)
            residual.sub_(q)  # v - codes * scale
            self._out_of_weight(residual, weight)
