"""Top-k and low-bit pseudo-gradients with error feedback: one all-gather per bucket."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.distributed as dist

from .._dist import all_gather_into
from ..compression import STEP_IN_RMS, Compression
from .base import ErrorFeedback, RoundContext

__all__ = ["ChunkedReducer", "RESIDUALS_KEY"]

#: the Local SGD entry's key for the error-feedback residuals (per rank)
RESIDUALS_KEY = "ef_residuals"


@dataclass
class _Plan:
    """One bucket cut into chunks: constants of its layout, built once per bucket.

    Each tensor of the bucket (a run ``[a, a + size)``) is cut into chunks of ``chunk``
    elements, its last chunk shorter; chunk ``c`` lives in row ``c`` of a ``(chunks, chunk)``
    padded layout. ``shifts``/``sizes`` map bucket element ``p`` of run ``j`` to padded
    position ``p + shifts[j]``.
    """

    numel: int
    chunks: int
    sizes: torch.Tensor  # (runs,) int64: elements per run
    shifts: torch.Tensor  # (runs,) int64
    count: torch.Tensor  # (chunks,) float64: elements a chunk's step is measured over
    kmax: int = 0  # top-k: the most any chunk sends
    rows: torch.Tensor | None = None  # (K,) the chunk of each value sent
    slots: torch.Tensor | None = None  # (K,) its slot in the (chunks, kmax) top-k output
    base: torch.Tensor | None = None  # (K,) rows * chunk: its chunk's first padded position
    sent: int = 0  # values sent per rank (K, or numel when dense)
    parts: dict = field(default_factory=dict)  # byte ranges of one rank's payload (:meth:`ChunkedReducer._layout`)

    def pad_of(self) -> torch.Tensor:
        """Each bucket element's padded position (made per round: 8 bytes per element)."""
        return torch.arange(self.numel, device=self.sizes.device) + torch.repeat_interleave(
            self.shifts, self.sizes, output_size=self.numel)


class ChunkedReducer(ErrorFeedback):
    """Average tensors across ranks sending each chunk's top-k and/or low-bit values, with error feedback.

    Per bucket of the deltas' flat layout, ``v = delta + feedback * residual`` is cut into
    per-tensor chunks (:class:`~localsgd_optim.compression.Compression`). Top-k keeps the
    ``ceil(fraction * len)`` largest magnitudes of each chunk; ``bits`` quantizes what is kept
    with a per-chunk step (``STEP_IN_RMS[bits]`` times the kept values' root mean square,
    accumulated in float64), levels ``(j - 2**(bits-1) + 1/2) * step``, codes packed 8/bits per
    byte. The residual becomes ``v - sent``. Each rank's payload (steps, values or codes, and
    chunk-relative positions) is one uint8 buffer of a size fixed by the layout, all-gathered
    in one collective per bucket; every rank decodes and sums the payloads in rank order, so
    all ranks get bit-identical means.

    Args:
        tensors: the tensors averaged in place (the pseudo-gradients), fixed order.
        spec: the compression.
        flat_params: the engine's layout setting (the residuals are laid out like it).
    """

    def __init__(self, tensors: Sequence[torch.Tensor], spec: Compression, flat_params: bool = True) -> None:
        super().__init__(tensors, flat_params, RESIDUALS_KEY,
                         f"pass a state dict saved by a LocalSGDOptimizer with compression={spec}")
        self.spec = spec
        self._plans: dict[tuple, _Plan] = {}
        self._buffers: dict[str, torch.Tensor] = {}
        self._shape: tuple = ()

    # -- layout ---------------------------------------------------------------------------------

    def _plan(self, bucket: Any) -> _Plan:
        key = (bucket.numel, tuple(bucket.offsets), bucket.device)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._make_plan(bucket)
        return plan

    def _make_plan(self, bucket: Any) -> _Plan:
        spec, n, c = self.spec, bucket.numel, self.spec.chunk
        offsets = list(bucket.offsets) + [n]
        sizes = [offsets[j + 1] - offsets[j] for j in range(len(bucket.offsets))]
        lengths, shifts, first = [], [], 0  # chunk lengths; padded shift per run
        for a, size in zip(offsets, sizes):
            shifts.append(first * c - a)
            full, tail = divmod(size, c)
            lengths += [c] * full + ([tail] if tail else [])
            first += full + (1 if tail else 0)
        kept = [spec.per_chunk(length) for length in lengths]
        device = bucket.device
        as_long = lambda xs: torch.tensor(xs, dtype=torch.int64, device=device)  # noqa: E731
        plan = _Plan(numel=n, chunks=len(lengths), sizes=as_long(sizes), shifts=as_long(shifts),
                     count=torch.tensor(kept, dtype=torch.float64, device=device).clamp_min(1))
        if spec.sparse:
            plan.kmax = max(kept, default=0)
            rows = torch.repeat_interleave(torch.arange(len(kept), device=device), as_long(kept))
            starts = torch.cumsum(as_long([0] + kept[:-1]), 0) if kept else as_long([])
            plan.rows = rows
            plan.slots = rows * plan.kmax + (torch.arange(rows.numel(), device=device) - starts[rows])
            plan.base = rows * c
            plan.sent = rows.numel()
        else:
            plan.sent = n
        plan.parts = self._layout(plan)
        return plan

    def _layout(self, plan: _Plan) -> dict[str, tuple[int, int]]:
        """Byte ranges of one rank's payload: steps (fp32), values (fp32) or codes, positions."""
        spec, parts, at = self.spec, {}, 0

        def take(name: str, nbytes: int, align: int) -> None:
            nonlocal at
            at = -(-at // align) * align
            parts[name] = (at, at + nbytes)
            at += nbytes

        if spec.bits is not None:
            take("steps", 4 * plan.chunks, 4)
            take("codes", math.ceil(plan.sent * spec.bits / 8), 1)
        else:
            take("values", 4 * plan.sent, 4)
        if spec.sparse:
            width = 1 if spec.chunk <= 256 else 2
            take("positions", width * plan.sent, width)
        parts["total"] = (0, -(-at // 4) * 4)  # every rank's segment starts 4-byte aligned
        return parts

    def prepare(self, ctx: RoundContext) -> None:
        super().prepare(ctx)
        buckets = [ctx.engine.buckets[pos] for pos in ctx.engine.bucket_range(ctx.lo, ctx.hi)]
        plans = [self._plan(b) for b in buckets]
        self._allocate(ctx.size, buckets, plans)

    def _allocate(self, world: int, buckets: list, plans: list[_Plan]) -> None:
        numel = max((p.numel for p in plans), default=0)
        padded = max((p.chunks * self.spec.chunk for p in plans), default=0)
        payload = max((p.parts["total"][1] for p in plans), default=0)
        shape = (world, numel, padded, payload)
        if self._shape == shape:
            return
        device = buckets[0].device if buckets else torch.device("cpu")
        f32 = dict(dtype=torch.float32, device=device)
        self._buffers = {
            "v": torch.empty(numel, **f32),
            "padded": torch.empty(padded if self.spec.sparse else 0, **f32),  # top-k's row layout
            "total": torch.empty(padded if self.spec.sparse else numel, **f32),
            "mine": torch.zeros(payload, dtype=torch.uint8, device=device),
            "everyone": torch.empty(world * payload, dtype=torch.uint8, device=device),
        }
        self._shape = shape

    # -- the round ------------------------------------------------------------------------------

    @torch.no_grad()
    def reduce(self, ctx: RoundContext, contributors: int, joined: bool,
               buffers: list[torch.Tensor] | None = None) -> None:
        """Compress, all-gather and decode each bucket of ``buffers`` (the deltas' flat slices)."""
        assert buffers is not None, "chunked compression reduces the flat layout"
        engine, group = ctx.engine, ctx.group
        world = dist.get_world_size(group)
        positions = engine.bucket_range(ctx.lo, ctx.hi)
        slices = engine.bucket_slices(buffers, ctx.lo, ctx.hi)
        residuals = engine.bucket_slices(self.flats, ctx.lo, ctx.hi)
        for pos, target, residual in zip(positions, slices, residuals):
            plan = self._plan(engine.buckets[pos])
            ctx.sent += self._reduce_bucket(plan, target, residual, group, world, contributors, joined)

    def _reduce_bucket(self, plan: _Plan, target: torch.Tensor, residual: torch.Tensor, group: Any, world: int,
                       contributors: int, joined: bool) -> int:
        spec, buf, c = self.spec, self._buffers, self.spec.chunk
        parts = plan.parts
        size = parts["total"][1]
        v = buf["v"][:plan.numel]
        pad_of = plan.pad_of()
        if joined:  # a rank that joined sends zeros and keeps its residual
            v.zero_()
        else:
            v.copy_(target)
            v.add_(residual, alpha=spec.feedback)
        mine = buf["mine"][:size]
        if spec.sparse:  # per chunk (a row of the padded layout), the largest magnitudes
            padded = buf["padded"][:plan.chunks * c].zero_().index_copy_(0, pad_of, v)
            scores = buf["total"][:padded.numel()].fill_(-1.0)  # padding never outranks an element
            scores.index_copy_(0, pad_of, v.abs())
            top = torch.topk(scores.view(plan.chunks, c), plan.kmax, dim=1, sorted=True).indices
            where = top.view(-1)[plan.slots]  # chunk-relative positions of the values sent
            at = plan.base + where
            self._view(mine, parts, "positions").copy_(where)
            rows, values = plan.rows, padded[at]
        else:  # every element, in the bucket's layout
            rows, values = torch.div(pad_of, c, rounding_mode="floor"), v
        sent = self._encode(values, rows, plan, mine, parts)  # what the others will decode
        if not joined:  # residual = v - sent, in the bucket's layout
            if spec.sparse:
                sent = padded.zero_().index_copy_(0, at, sent)[pad_of]
            torch.sub(v, sent, out=residual)
        everyone = buf["everyone"][:world * size]
        all_gather_into(everyone, mine, group)
        total = buf["total"][:plan.chunks * c if spec.sparse else plan.numel].zero_()
        for r in range(world):  # rank order: the same sum on every rank
            theirs = everyone[r * size:(r + 1) * size]
            decoded = self._decode(theirs, rows, plan, parts)
            if spec.sparse:
                total.index_add_(0, plan.base + self._view(theirs, parts, "positions").long(), decoded)
            else:
                total.add_(decoded)
        target.copy_((total[pad_of] if spec.sparse else total).div_(contributors))
        return size

    # -- payload ----------------------------------------------------------------------------------

    def _view(self, payload: torch.Tensor, parts: dict, name: str) -> torch.Tensor:
        a, b = parts[name]
        dtype = {"steps": torch.float32, "values": torch.float32, "codes": torch.uint8,
                 "positions": torch.uint8 if self.spec.chunk <= 256 else torch.int16}[name]
        return payload[a:b].view(dtype)

    def _encode(self, values: torch.Tensor, rows: torch.Tensor, plan: _Plan, payload: torch.Tensor,
                parts: dict) -> torch.Tensor:
        """Write ``values`` (the chunk of each: ``rows``) into ``payload``; return what the receivers will
        decode from it."""
        bits = self.spec.bits
        if bits is None:
            self._view(payload, parts, "values").copy_(values)
            return values
        # each chunk's step: STEP_IN_RMS[bits] x the root mean square of its values (sums in float64)
        sums = torch.zeros(plan.chunks, dtype=torch.float64, device=values.device)
        sums.index_add_(0, rows, values.double().square())
        steps = sums.div_(plan.count).sqrt_().float().mul_(STEP_IN_RMS[bits])
        self._view(payload, parts, "steps").copy_(steps)
        half = 2 ** (bits - 1)
        divisor = steps.clamp_min(torch.finfo(torch.float32).tiny)[rows]  # an all-zero chunk: codes of 0 / tiny
        codes = torch.floor(values / divisor).add_(half).clamp_(0, 2 * half - 1).to(torch.uint8)
        _pack(codes, bits, self._view(payload, parts, "codes"))
        return codes.float().sub_(half - 0.5).mul_(steps[rows])

    def _decode(self, payload: torch.Tensor, rows: torch.Tensor, plan: _Plan, parts: dict) -> torch.Tensor:
        """The values one rank sent, in the order :meth:`_encode` took them."""
        bits = self.spec.bits
        if bits is None:
            return self._view(payload, parts, "values")
        steps = self._view(payload, parts, "steps")
        codes = _unpack(self._view(payload, parts, "codes"), bits, plan.sent)
        return codes.float().sub_(2 ** (bits - 1) - 0.5).mul_(steps[rows])


def _pack(codes: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """``codes`` (uint8 < 2**bits) into ``out``, 8 // bits per byte, the first in the low bits."""
    if bits == 8:
        out.copy_(codes)
        return
    per = 8 // bits
    padded = torch.zeros(out.numel() * per, dtype=torch.int32, device=codes.device)
    padded[:codes.numel()] = codes
    shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=codes.device)
    out.copy_((padded.view(-1, per) << shifts).sum(dim=1))


def _unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    if bits == 8:
        return packed[:count]
    shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=packed.device)
    return ((packed.to(torch.int32)[:, None] >> shifts) & (2 ** bits - 1)).view(-1)[:count]
