"""Top-k and low-bit pseudo-gradients with error feedback: one all-gather per bucket, streamed."""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.distributed as dist

from .._dist import group_rank
from .._schedule import _is_int
from ..compression import STEP_IN_RMS, Compression
from ._kernel import codec, pointer
from .base import ErrorFeedback, RoundContext

__all__ = ["ChunkedReducer", "ReduceScatterReducer", "RESIDUALS_KEY", "SHARD_RESIDUALS_KEY"]

#: the Local SGD entry's key for the error-feedback residuals (per rank)
RESIDUALS_KEY = "ef_residuals"
#: and for the reduce-scatter's second residuals (each rank's, over the mean shard it owns)
SHARD_RESIDUALS_KEY = "ef_shard_residuals"

#: the float64 sums of squares of a dense round run over at most this share of the scratch at a time
_SQUARES_SHARE = 8


@dataclass
class _Plan:
    """One bucket cut into chunks: constants of its layout, built once per bucket (O(tensors + chunks)).

    Each tensor of the bucket (a run of ``size`` elements at ``offset``) is cut into chunks of
    ``chunk`` elements, its last chunk shorter. The scratch holds the bucket as ``(chunks, chunk)``
    rows, a tensor's elements from row ``row`` on: :meth:`views` pairs each run in the bucket with
    its rows, so one ``_foreach`` op moves a whole bucket between the two layouts. A tensor made of
    whole chunks and the tensors after it are one run (they lie alike in both layouts): fewer views.
    """

    numel: int
    chunks: int
    runs: list[tuple[int, int, int]]  # (offset in the bucket, first padded position, size), non-empty runs
    starts: torch.Tensor  # (chunks,) int64: each chunk's first element in the bucket
    lengths: torch.Tensor  # (chunks,) int64: each chunk's elements
    kept: torch.Tensor  # (chunks,) int64: values each chunk sends
    count: torch.Tensor  # (chunks,) float64: elements a chunk's step is measured over
    short: torch.Tensor  # (rows,) int64: the chunks shorter than ``chunk`` (their padding is written)
    kmax: int = 0  # top-k: the most any chunk sends
    ragged: bool = False  # top-k: some chunk sends fewer than kmax
    sent: int = 0  # values sent per rank (K, or numel when dense)
    covered: bool = False  # the runs cover the whole bucket (no gaps between its tensors)
    parts: dict = field(default_factory=dict)  # byte ranges of one rank's payload (:meth:`ChunkedReducer._layout`)
    _views: dict = field(default_factory=dict)

    def views(self, buffer: torch.Tensor, padded: bool) -> list[torch.Tensor]:
        """Each run's view of ``buffer``: the bucket's layout, or the scratch's rows (``padded``); cached."""
        key = (buffer.data_ptr(), buffer.numel(), buffer.dtype, padded)
        found = self._views.get(key)
        if found is None:
            found = self._views[key] = [buffer[(p if padded else a):(p if padded else a) + size]
                                        for a, p, size in self.runs]
        return found

    def rows(self) -> torch.Tensor:
        """Top-k: the chunk of each value sent, in payload order (made per round: 8 bytes per value sent)."""
        return torch.repeat_interleave(self.kept, output_size=self.sent)


class ChunkedReducer(ErrorFeedback):
    """Average tensors across ranks sending each chunk's top-k and/or low-bit values, with error feedback.

    Per bucket of the deltas' flat layout, ``v = delta + feedback * residual`` is cut into
    per-tensor chunks (:class:`~localsgd_optim.compression.Compression`). Top-k keeps the
    ``ceil(fraction * len)`` largest magnitudes of each chunk (sent in the order of their positions);
    ``bits`` quantizes what is kept with a per-chunk step (``STEP_IN_RMS[bits]`` times the kept
    values' root mean square, accumulated in float64), levels ``(j - 2**(bits-1) + 1/2) * step``,
    codes packed 8/bits per byte. The residual becomes ``v - sent``. Each rank's payload (steps,
    values or codes, and chunk-relative positions) is one uint8 buffer of a size fixed by the
    layout, all-gathered in one collective per bucket; every rank decodes the payloads one at a
    time, in rank order, adding them into the bucket (top-k: a scatter-add of the kept values), so all ranks get
    bit-identical means. (Dense rounds: ranks 0 and 1 start the sum from the levels they encoded
    themselves instead of decoding their own payload; the first two terms of a sum commute, so
    the sum is the rank-order sum, bit for bit.)

    On the CPU, encode and decode run the fused C kernels of ``_codec.c`` (:mod:`._kernel`): one
    pass per stage, the same float32 operations element by element, so the same bytes as the eager
    path below, but for ties between equal magnitudes (the kernels keep the earliest) and a dense
    chunk's float64 sum of squares, whose order differs (a step a bit apart in about 1e-8 of chunks).

    Memory: ``v`` is built in the residual itself and the mean in the bucket (fp32 buckets), so a
    round adds one scratch of the bucket padded to whole chunks, this rank's payload and the W
    gathered payloads, plus per-round indices of the values sent (top-k: about 30 bytes each), and
    (dense) the codes one byte each and a buffer for float64 squares over an eighth of the scratch
    at a time (which also takes the packing's shifted words): flat in the model's size.

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
        self._where: list[tuple[int, int]] = []  # the last round's bucket slices (deltas, residuals)

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
        runs, starts, lengths = [], [], []
        for a, b in zip(offsets, offsets[1:]):
            if b > a and runs and runs[-1][2] % c == 0 and runs[-1][0] + runs[-1][2] == a:
                first, at, size = runs[-1]  # after whole chunks, both layouts go on alike: one run
                runs[-1] = (first, at, size + b - a)
            elif b > a:
                runs.append((a, len(lengths) * c, b - a))
            for s in range(a, b, c):
                starts.append(s)
                lengths.append(min(c, b - s))
        kept = [spec.per_chunk(length) for length in lengths]
        device = bucket.device
        as_long = lambda xs: torch.tensor(xs, dtype=torch.int64, device=device)  # noqa: E731
        plan = _Plan(numel=n, chunks=len(lengths), runs=runs, starts=as_long(starts), lengths=as_long(lengths),
                     kept=as_long(kept),
                     count=torch.tensor(kept, dtype=torch.float64, device=device).clamp_min(1),
                     short=as_long([row for row, length in enumerate(lengths) if length < c]))
        plan.covered = sum(size for _, _, size in runs) == n
        if spec.sparse:
            plan.kmax = max(kept, default=0)
            plan.ragged = any(k != plan.kmax for k in kept)
            plan.sent = sum(kept)
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
            width = self._width()
            take("positions", width * plan.sent, width)
        parts["total"] = (0, -(-at // 4) * 4)  # every rank's segment starts 4-byte aligned
        return parts

    def prepare(self, ctx: RoundContext) -> None:
        super().prepare(ctx)
        buckets = [ctx.engine.buckets[pos] for pos in ctx.engine.bucket_range(ctx.lo, ctx.hi)]
        plans = [self._plan(b) for b in buckets]
        self._allocate(ctx.size, buckets, plans)

    def _allocate(self, world: int, buckets: list, plans: list[_Plan]) -> None:
        device = buckets[0].device if buckets else torch.device("cpu")
        self._lib = codec(device)  # the fused C kernels (CPU), or None: the eager path
        eager = self._lib is None
        padded = max((p.chunks * self.spec.chunk for p in plans), default=0) if eager else 0
        payload = max((p.parts["total"][1] for p in plans), default=0)
        # dense: the codes one byte each in the bucket's layout, padded to whole bytes of the wire (kernels,
        # top-k: the codes of the values sent)
        codes = max((_whole_bytes(p.sent if self.spec.sparse else p.numel, self.spec.bits) for p in plans), default=0)
        codes = 0 if self.spec.bits is None or (self.spec.sparse and eager) else codes
        # (dense, eager) float64 squares of a block of rows, and the packing's shifted words: as many bytes as the codes
        squares = 0 if self.spec.sparse or not eager else max(
            (max(self._block(p) * self.spec.chunk, -(-_whole_bytes(p.numel, self.spec.bits) // 8)) for p in plans),
            default=0)
        # a mean accumulates in fp32: in the bucket itself, or (other dtypes) in a buffer of its own
        total = max((b.numel for b in buckets if b.dtype != torch.float32), default=0)
        shape = (world, padded, payload, codes, total, squares)
        if self._shape == shape:
            return
        self._buffers = {
            "scratch": torch.empty(padded, dtype=torch.float32, device=device),  # the (chunks, chunk) rows
            "codes": torch.zeros(codes, dtype=torch.uint8, device=device),
            "squares": torch.empty(squares, dtype=torch.float64, device=device),
            "total": torch.empty(total, dtype=torch.float32, device=device),
            "mine": torch.zeros(payload, dtype=torch.uint8, device=device),
            "everyone": torch.empty(world * payload, dtype=torch.uint8, device=device),
        }
        self._forget_views()  # views of the old buffers go with them
        self._shape = shape

    def _forget_views(self) -> None:
        for plan in self._plans.values():
            plan._views.clear()

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
        where = [(t.data_ptr(), r.data_ptr()) for t, r in zip(slices, residuals)]
        if where != self._where:  # the deltas or residuals moved: views of the old ones would keep them alive
            self._forget_views()
            self._where = where
        for i, (pos, target, residual) in enumerate(zip(positions, slices, residuals)):
            ctx.sent += self._reduce_at(i, engine.buckets[pos], target, residual, group, world, contributors,
                                        joined, ctx.weight)

    def _reduce_at(self, i: int, bucket: Any, target: torch.Tensor, residual: torch.Tensor, group: Any,
                   world: int, contributors: int, joined: bool, weight: int | None) -> int:
        """The round's ``i``-th bucket; returns the bytes this rank handed to its collectives."""
        return self._reduce_bucket(self._plan(bucket), target, residual, group, world, contributors, joined, weight)

    def _reduce_bucket(self, plan: _Plan, target: torch.Tensor, residual: torch.Tensor, group: Any, world: int,
                       contributors: int, joined: bool, weight: int | None = None) -> int:
        size = plan.parts["total"][1]
        joined = joined or not plan.numel  # (an empty bucket: nothing to build, send or keep)
        mine = self._buffers["mine"][:size]
        total = target if target.dtype == torch.float32 else self._buffers["total"][:plan.numel]
        # dense, ranks 0 and 1: the sum starts from this rank's own levels, written by the encode (the first
        # two terms of a sum commute: the same sum as in rank order, bit for bit), one decode fewer
        rank = group_rank(group)
        own = not (self.spec.sparse or joined) and plan.covered and rank < 2
        # v = delta + feedback * residual, built in the residual (a rank that joined sends zeros), which
        # becomes v - sent
        if self.spec.sparse:
            self._encode_sparse(plan, residual, mine, joined, target, weight)
        else:
            self._encode_dense(plan, residual, mine, joined, total if own else None, target, weight)
        if not joined:
            self._out_of_weight(residual, weight)  # (w * v - sent) / w: in this rank's own units
        everyone = self._buffers["everyone"][:world * size]
        self._gather(everyone, mine, group)
        if not own:
            total.zero_()
        # rank order (but for the commuting first two): the same sum on every rank
        ranks = [r for r in range(world) if not (own and r == rank)]
        if self.spec.sparse:
            decode = self._decode_sparse(plan)
            for r in ranks:
                decode(plan, everyone[r * size:(r + 1) * size], total)
            total.div_(contributors)
        else:
            self._decode_mean(plan, [everyone[r * size:(r + 1) * size] for r in ranks], total, contributors)
        if total is not target:
            target.copy_(total)
        return size

    # -- top-k ----------------------------------------------------------------------------------

    def _encode_sparse(self, plan: _Plan, v: torch.Tensor, payload: torch.Tensor, joined: bool,
                       delta: torch.Tensor | None = None, weight: int | None = None) -> None:
        """Per chunk, the ``kept`` largest magnitudes of ``v`` (chunk-relative positions) into ``payload``
        (``v`` built first from ``delta``: :meth:`_build`)."""
        fused = self._build(v, delta, weight, joined, self.spec.feedback)
        if self._lib is not None:
            bits, parts = self.spec.bits, plan.parts
            view = lambda name: pointer(self._view(payload, parts, name)) if name in parts else None  # noqa: E731
            if self._lib.lsgd_topk_encode(pointer(v), *fused, plan.chunks, pointer(plan.starts),
                                          pointer(plan.lengths), pointer(plan.kept), self.spec.chunk, bits or 0,
                                          STEP_IN_RMS.get(bits, 0.0), joined, self._width(), view("positions"),
                                          view("values"), view("steps"), pointer(self._buffers["codes"]),
                                          view("codes")):
                raise MemoryError(f"compression={self.spec}: the top-k kernel could not allocate its scratch "
                                  f"({20 * self.spec.chunk} bytes)")
            return
        rows = plan.rows()
        if joined:  # zeros, sent from each chunk's first position; the residual is kept
            where = torch.zeros(plan.sent, dtype=torch.int64, device=v.device)
            values = torch.zeros(plan.sent, dtype=torch.float32, device=v.device)
        else:
            scores = self._buffers["scratch"][:plan.chunks * self.spec.chunk].view(plan.chunks, self.spec.chunk)
            scores.index_fill_(0, plan.short, -1.0)  # padding never outranks an element
            rows_of_scores = plan.views(scores.view(-1), padded=True)
            torch._foreach_copy_(rows_of_scores, plan.views(v, padded=False))
            torch._foreach_abs_(rows_of_scores)
            top = torch.topk(scores, plan.kmax, dim=1, sorted=True).indices
            if plan.ragged:  # a short chunk sends its first ``kept`` (the largest), in the order of their positions
                mask = torch.arange(plan.kmax, device=v.device) < plan.kept[:, None]
                top = top.masked_fill_(~mask, self.spec.chunk).sort(dim=1).values.masked_select(mask)
            else:
                top = top.sort(dim=1).values
            where = top.view(-1)
            at = plan.starts.index_select(0, rows).add_(where)  # the values' places in the bucket
            values = v.index_select(0, at)
        self._view(payload, plan.parts, "positions").copy_(where)
        sent = self._encode_values(values, rows, plan, payload)
        if not joined:  # residual = v - sent where something was sent, v elsewhere
            v.index_copy_(0, at, values.sub_(sent))

    def _decode_sparse(self, plan: _Plan):  # type: ignore[no-untyped-def]
        if self._lib is not None:
            bits, parts, codes = self.spec.bits, plan.parts, pointer(self._buffers["codes"])

            def fused(plan: _Plan, payload: torch.Tensor, total: torch.Tensor) -> None:
                view = lambda name: pointer(self._view(payload, parts, name)) if name in parts else None  # noqa: E731
                self._lib.lsgd_topk_decode(plan.chunks, pointer(plan.starts), pointer(plan.kept), bits or 0,
                                           self._width(), view("positions"), view("values"), view("steps"),
                                           view("codes"), plan.sent, codes, pointer(total))

            return fused
        rows = plan.rows()
        starts = plan.starts.index_select(0, rows)  # once per bucket, for every rank's payload

        def decode(plan: _Plan, payload: torch.Tensor, total: torch.Tensor) -> None:
            at = self._view(payload, plan.parts, "positions").to(torch.int64).add_(starts)
            total.index_add_(0, at, self._decode_values(payload, rows, plan))

        return decode

    def _encode_values(self, values: torch.Tensor, rows: torch.Tensor, plan: _Plan,
                       payload: torch.Tensor) -> torch.Tensor:
        """Write top-k's ``values`` (the chunk of each: ``rows``) into ``payload``; return what the receivers
        will decode from it."""
        bits, parts = self.spec.bits, plan.parts
        if bits is None:
            self._view(payload, parts, "values").copy_(values)
            return values
        # each chunk's step: STEP_IN_RMS[bits] x the root mean square of its values (sums in float64)
        sums = torch.zeros(plan.chunks, dtype=torch.float64, device=values.device)
        sums.index_add_(0, rows, values.double().square())
        steps = self._steps(sums, plan, payload)
        half = 2 ** (bits - 1)
        codes = torch.floor(values / steps.clamp_min(torch.finfo(torch.float32).tiny).index_select(0, rows))
        codes.add_(half).clamp_(0, 2 * half - 1)
        packed = torch.zeros(_whole_bytes(plan.sent, bits), dtype=torch.uint8, device=values.device)
        packed[:plan.sent].copy_(codes)
        _pack(packed, bits, self._view(payload, parts, "codes"))
        return codes.sub_(half - 0.5).mul_(steps.index_select(0, rows))

    def _decode_values(self, payload: torch.Tensor, rows: torch.Tensor, plan: _Plan) -> torch.Tensor:
        """The values one rank sent, in the order :meth:`_encode_values` took them."""
        bits = self.spec.bits
        if bits is None:
            return self._view(payload, plan.parts, "values")
        steps = self._view(payload, plan.parts, "steps")
        codes = torch.empty(_whole_bytes(plan.sent, bits), dtype=torch.uint8, device=payload.device)
        _unpack(self._view(payload, plan.parts, "codes"), bits, codes)
        return codes[:plan.sent].float().sub_(2 ** (bits - 1) - 0.5).mul_(steps.index_select(0, rows))

    def _steps(self, sums: torch.Tensor, plan: _Plan, payload: torch.Tensor) -> torch.Tensor:
        """Each chunk's step from its sum of squares (float64), written into ``payload`` too."""
        steps = sums.div_(plan.count).sqrt_().float().mul_(STEP_IN_RMS[self.spec.bits])  # type: ignore[index]
        self._view(payload, plan.parts, "steps").copy_(steps)
        return steps

    # -- every element --------------------------------------------------------------------------

    def _block(self, plan: _Plan) -> int:
        """Dense: the rows whose float64 squares are summed at a time."""
        return max(1, plan.chunks // _SQUARES_SHARE)

    def _blocks(self, plan: _Plan, rows: torch.Tensor) -> tuple[torch.Tensor, list[tuple]]:
        """Dense: the chunks' float64 sums of squares, and each block of ``rows`` with its squares' place
        and its sums (made once per layout of the buffers)."""
        key = ("blocks", rows.data_ptr(), rows.shape)
        found = plan._views.get(key)
        if found is None:
            block, squares = self._block(plan), self._buffers["squares"]
            sums = torch.empty(plan.chunks, dtype=torch.float64, device=rows.device)
            found = plan._views[key] = (sums, [
                (part, squares[:part.numel()].view(part.shape), sums[lo:lo + block])
                for lo, part in ((lo, rows[lo:lo + block]) for lo in range(0, plan.chunks, block))])
        return found

    def _encode_dense(self, plan: _Plan, v: torch.Tensor, payload: torch.Tensor, joined: bool,
                      levels: torch.Tensor | None = None, delta: torch.Tensor | None = None,
                      weight: int | None = None) -> None:
        """Every element of ``v`` at ``bits`` bits, a step per chunk, codes in the bucket's order.

        The code of ``x = v / step`` is ``floor(clamp(x, -h, h - 1)) + h`` (``h = 2**(bits-1)``), the same
        integer as ``clamp(floor(x) + h, 0, 2h - 1)``; it travels as the int8 ``c = floor(clamp(...))``,
        made a code by bit operations on whole words (``(c & mask) ^ h``), and ``c + 1/2`` is its level
        in steps: ``code - (h - 1/2)``, exactly. Float64 squares are summed an eighth of the rows at a
        time, in a buffer of their own (allocating them each round cost more than the arithmetic). ``levels``
        (laid out like ``v``, whose runs cover it): written with the levels sent, which are never -0, so
        this is bit for bit ``0 + levels``."""
        bits, c = self.spec.bits, self.spec.chunk
        assert bits is not None
        fused = self._build(v, delta, weight, joined, self.spec.feedback)
        if self._lib is not None:
            self._lib.lsgd_dense_encode(pointer(v), *fused, plan.numel, plan.chunks, pointer(plan.starts),
                                        pointer(plan.lengths), bits, STEP_IN_RMS[bits], joined,
                                        pointer(self._view(payload, plan.parts, "steps")),
                                        pointer(self._buffers["codes"]),
                                        pointer(self._view(payload, plan.parts, "codes")),
                                        pointer(levels))
            return
        rows = self._buffers["scratch"][:plan.chunks * c].view(plan.chunks, c)
        padded = plan.views(rows.view(-1), padded=True)
        if joined:
            rows.zero_()
        else:
            rows.index_fill_(0, plan.short, 0.0)  # padding adds nothing to a sum of squares
            torch._foreach_copy_(padded, plan.views(v, padded=False))
        sums, blocks = self._blocks(plan, rows)
        for part, wide, out in blocks:  # exact float64 squares (fp32 products fit), summed per row
            torch.sum(wide.copy_(part).square_(), dim=1, out=out)
        steps = self._steps(sums, plan, payload)
        half = 2 ** (bits - 1)
        rows.div_(steps.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).clamp_(-half, half - 1).floor_()
        codes = self._buffers["codes"][:_whole_bytes(plan.numel, bits)]
        torch._foreach_copy_(plan.views(codes.view(torch.int8), padded=False), padded)
        _offset(codes, bits)
        codes[plan.numel:].zero_()  # the last byte's unused codes
        _pack(codes, bits, self._view(payload, plan.parts, "codes"), self._buffers["squares"])
        if not joined:  # residual = v - sent
            rows.add_(0.5).mul_(steps[:, None])
            torch._foreach_sub_(plan.views(v, padded=False), padded)
            if levels is not None:
                torch._foreach_copy_(plan.views(levels, padded=False), padded)

    def _decode_mean(self, plan: _Plan, payloads: list[torch.Tensor], total: torch.Tensor, divisor: int) -> None:
        """The payloads' levels added into ``total`` in turn, then ``total`` divided by ``divisor`` (by the last
        decode, on the C kernels' path)."""
        for j, payload in enumerate(payloads):
            last = self._lib is not None and j == len(payloads) - 1
            self._decode_dense(plan, payload, total, divisor if last else 0)
        if self._lib is None or not payloads:
            total.div_(divisor)

    def _decode_dense(self, plan: _Plan, payload: torch.Tensor, total: torch.Tensor, divisor: int = 0) -> None:
        """One rank's levels ``(code - (h - 1/2)) * step``, added into ``total`` (C kernels: then divided by
        ``divisor`` unless it is 0)."""
        bits, c = self.spec.bits, self.spec.chunk
        assert bits is not None and (divisor == 0 or self._lib is not None)
        if self._lib is not None:
            self._lib.lsgd_dense_decode(pointer(self._view(payload, plan.parts, "codes")),
                                        pointer(self._view(payload, plan.parts, "steps")), plan.numel, plan.chunks,
                                        pointer(plan.starts), pointer(plan.lengths), bits,
                                        pointer(self._buffers["codes"]), pointer(total), float(divisor))
            return
        codes = self._buffers["codes"][:_whole_bytes(plan.numel, bits)]
        _unpack(self._view(payload, plan.parts, "codes"), bits, codes, self._buffers["squares"])
        rows = self._buffers["scratch"][:plan.chunks * c].view(plan.chunks, c)
        padded = plan.views(rows.view(-1), padded=True)
        torch._foreach_copy_(padded, plan.views(codes, padded=False))
        rows.sub_(2 ** (bits - 1) - 0.5).mul_(self._view(payload, plan.parts, "steps")[:, None])
        torch._foreach_add_(plan.views(total, padded=False), padded)

    # -- payload ----------------------------------------------------------------------------------

    def _view(self, payload: torch.Tensor, parts: dict, name: str) -> torch.Tensor:
        a, b = parts[name]
        dtype = {"steps": torch.float32, "values": torch.float32, "codes": torch.uint8,
                 "positions": torch.uint8 if self._width() == 1 else torch.int16}[name]
        return payload[a:b].view(dtype)

    def _width(self) -> int:
        """Bytes of a chunk-relative position (top-k)."""
        return 1 if self.spec.chunk <= 256 else 2


@dataclass
class _Span:
    """A run of a bucket planned like a bucket: a shard of it (its tensors' offsets from its start)."""

    numel: int
    offsets: list[int]
    device: torch.device


class ReduceScatterReducer(ChunkedReducer):
    """Dense low-bit rounds as a reduce-scatter of the codes, then an all-gather of the requantized means.

    ZeRO++'s qgZ (Wang et al., 2023, https://arxiv.org/abs/2306.10209) with the two-stage error feedback
    of 1-bit Adam's compressed all-reduce (Tang et al., 2021, https://arxiv.org/abs/2102.02888). Per
    bucket of W ranks:

    1. every rank builds ``v = delta + feedback * residual`` and encodes it as :class:`ChunkedReducer`
       does (the same codes and steps, chunk by chunk; the residual keeps ``v - sent``), cut into W
       shards of whole chunks (shard j: chunks ``[j * chunks // W, (j + 1) * chunks // W)``), each in a
       slot of one layout (its steps, then its packed codes); one ``all_to_all_single`` sends slot j to
       rank j;
    2. rank j decodes the W slots it received, in rank order, summing from zero in fp32 into its shard
       of the bucket, and divides by ``contributors`` (the total weight of a weighted round): the mean
       shard, one pass over 1/W of the bucket per rank;
    3. rank j requantizes its mean shard with the same quantizer and a second residual of its own, over
       the shard it owns: ``u = mean + feedback * second``, sent ``Q(u)``, ``second = u - Q(u)``; one
       all-gather of the slots; every rank decodes every shard into the bucket: the same bytes on every
       rank, so the same mean, by construction.

    A rank that joined (or has weight 0) sends zeros in stage 1 and keeps its first residual, as with the
    all-gather; it still owns its shard in stages 2 and 3. The mean is quantized twice: its error is
    the first stage's (carried by each rank's residual) plus the second's (carried by the owner's).

    The second residuals are saved under ``ef_shard_residuals`` with the world size, the rank and each
    shard's bounds. A round whose shards differ (another world size or rank, other buckets) starts them
    from zero with a warning: they are the owner's rounding of the *mean* (at most half a step of it per
    element but for clipping), one round's worth, so dropping them costs one round's requantization
    error, once; refusing would forbid elastic resizes and :func:`~localsgd_optim.checkpoint.consolidate`
    (which drops them) for this compressor, while the first residuals, laid out like the parameters,
    are kept.

    Memory: a round adds the scratch of a shard (padded to whole chunks), its codes one byte each and
    float64 squares, the W slots sent and the W slots received (one payload each, about), one slot
    of this rank's: about 1/W of the all-gather's W payloads per stage; the second residual (persistent)
    is 1/W of the model in fp32.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], spec: Compression, flat_params: bool = True) -> None:
        super().__init__(tensors, spec, flat_params)
        self._shard_plans: dict[tuple, list[tuple[int, int, _Plan]]] = {}
        self.second: list[torch.Tensor] = []  # per bucket of the round: the residual of this rank's shard
        self._owned: tuple | None = None  # (world, rank, ((bucket position, start, end), ...)) of ``second``
        self._saved: dict | None = None  # a loaded entry, used once the round's shards are known

    def _shards(self, bucket: Any, world: int) -> list[tuple[int, int, _Plan]]:
        """The bucket's W shards of whole chunks: (start, end, plan), every slot laid out alike: each
        shard's steps from byte 0, its codes after the most steps any shard has (made once per layout)."""
        key = (bucket.numel, tuple(bucket.offsets), bucket.device, world)
        found = self._shard_plans.get(key)
        if found is None:
            whole = self._plan(bucket)
            starts = whole.starts.tolist() + [bucket.numel]
            cuts = [0] + [starts[j * whole.chunks // world] for j in range(1, world)] + [bucket.numel]
            found = []
            for a, b in zip(cuts, cuts[1:]):
                offsets = [o - a for o in bucket.offsets if a <= o < b]
                found.append((a, b, self._make_plan(_Span(b - a, [0] * (not offsets or offsets[0] > 0) + offsets,
                                                          bucket.device))))
            first = 4 * max(p.chunks for _, _, p in found)
            size = max(math.ceil(p.sent * self.spec.bits / 8) for _, _, p in found)  # type: ignore[operator]
            for _, _, p in found:
                p.parts = {"steps": (0, 4 * p.chunks), "codes": (first, first + math.ceil(p.sent * self.spec.bits / 8)),
                           "total": (0, -(-(first + size) // 4) * 4)}
            self._shard_plans[key] = found
        return found

    def _forget_views(self) -> None:
        super()._forget_views()
        for shards in self._shard_plans.values():
            for _, _, plan in shards:
                plan._views.clear()

    def prepare(self, ctx: RoundContext) -> None:
        ErrorFeedback.prepare(self, ctx)
        positions = ctx.engine.bucket_range(ctx.lo, ctx.hi)
        buckets = [ctx.engine.buckets[pos] for pos in positions]
        rank = group_rank(ctx.group)
        shards = [self._shards(b, ctx.size) for b in buckets]
        self._allocate(ctx.size, buckets, [p for s in shards for _, _, p in s])
        sent = self._buffers["everyone"]
        if self._buffers.get("sent") is None or self._buffers["sent"].numel() != sent.numel():
            self._buffers["sent"] = torch.zeros_like(sent)  # the all-to-all's input, then the all-gather's output
        owned = (ctx.size, rank, tuple((pos, s[rank][0], s[rank][1]) for pos, s in zip(positions, shards)))
        if owned != self._owned or self._saved is not None:
            self._own(owned, [b.device for b in buckets])

    def _own(self, owned: tuple, devices: list[torch.device]) -> None:
        """Second residuals for the shards of ``owned``: the saved ones if they are these shards, else zeros."""
        second = [torch.zeros(b - a, dtype=torch.float32, device=d) for (_, a, b), d in zip(owned[2], devices)]
        saved, before = self._saved, self._owned
        if saved is not None and _shards_of(saved) == owned:
            with torch.no_grad():
                for mine, theirs in zip(second, saved["residuals"]):
                    mine.copy_(theirs)
        elif saved is not None or before is not None:
            world, rank = (saved["world_size"], saved["rank"]) if saved is not None else before[:2]  # type: ignore[index]
            warnings.warn(
                f"compression={self.spec}: the second-stage (mean shard) residuals were kept by rank {rank} of "
                f"{world} over other shards; this round is rank {owned[1]} of {owned[0]}: they start from zero (the "
                "first-stage residuals are kept). To keep them, resume with the same world size, rank and "
                "bucket_cap_mb", stacklevel=2)
        self.second, self._owned, self._saved = second, owned, None

    def _reduce_at(self, i: int, bucket: Any, target: torch.Tensor, residual: torch.Tensor, group: Any,
                   world: int, contributors: int, joined: bool, weight: int | None) -> int:
        if not bucket.numel:
            return 0
        buf, shards, rank = self._buffers, self._shards(bucket, world), self._owned[1]  # type: ignore[index]
        size = shards[0][2].parts["total"][1]
        sent, received = buf["sent"][:world * size], buf["everyone"][:world * size]
        total = target if target.dtype == torch.float32 else buf["total"][:bucket.numel]
        for j, (a, b, plan) in enumerate(shards):  # stage 1: v = delta + feedback * residual, in the residual
            if plan.numel:
                self._encode_dense(plan, residual[a:b], sent[j * size:(j + 1) * size], joined, None, target[a:b],
                                   weight)
        if not joined:
            self._out_of_weight(residual, weight)
        self._scatter(received, sent, group)
        a, b, plan = shards[rank]
        mine = buf["mine"][:size]
        if plan.numel:  # stage 2: this rank's mean shard, summed in rank order; requantized with its residual
            mean = total[a:b].zero_()
            self._decode_mean(plan, [received[r * size:(r + 1) * size] for r in range(world)], mean, contributors)
            # u = mean + feedback * second, in the second residual, which becomes u - sent; the mean shard
            # becomes the levels sent (what the others decode, bit for bit: see _encode_dense), so this rank
            # does not decode its own slot
            self._encode_dense(plan, self.second[i], mine, False, mean, mean)
        self._gather(sent, mine, group)  # stage 3: every other mean shard, decoded alike on every rank
        for r, (a, b, plan) in enumerate(shards):
            if plan.numel and r != rank:
                self._decode_dense(plan, sent[r * size:(r + 1) * size], total[a:b].zero_())
        if total is not target:
            target.copy_(total)
        return world * size  # the all-to-all's input, one payload: the wire carries 2 (W - 1) / W of it

    def _scatter(self, out: torch.Tensor, slots: torch.Tensor, group: Any) -> None:
        """Slot j of ``slots`` to rank j; rank r's slot for this rank into slot r of ``out`` (the bench's
        compute floor replaces it)."""
        dist.all_to_all_single(out, slots, group=group)

    def state(self, entry: dict[str, Any]) -> None:
        super().state(entry)
        if self._saved is not None:  # loaded and not yet used: saved again as it was
            entry[SHARD_RESIDUALS_KEY] = self._saved
        elif self._owned is not None:
            world, rank, shards = self._owned
            entry[SHARD_RESIDUALS_KEY] = {"world_size": world, "rank": rank, "shards": [list(s) for s in shards],
                                          "residuals": list(self.second)}

    def check_state(self, entry: dict[str, Any] | None) -> None:
        super().check_state(entry)
        saved = entry.get(SHARD_RESIDUALS_KEY) if isinstance(entry, dict) else None
        if saved is None:
            return
        ok = (isinstance(saved, dict) and _is_int(saved.get("world_size")) and _is_int(saved.get("rank"))
              and isinstance(saved.get("shards"), list) and isinstance(saved.get("residuals"), list)
              and len(saved["shards"]) == len(saved["residuals"])
              and all(isinstance(s, (list, tuple)) and len(s) == 3 and all(map(_is_int, s)) for s in saved["shards"])
              and all(isinstance(r, torch.Tensor) and r.dtype == torch.float32 and r.dim() == 1
                      and r.numel() == s[2] - s[1] for s, r in zip(saved["shards"], saved["residuals"])))
        if not ok:
            raise ValueError(
                f"'{SHARD_RESIDUALS_KEY}' of the Local SGD entry must be a dict of world_size, rank, shards "
                "([bucket, start, end] each) and residuals (one 1-D fp32 tensor per shard, of its length), got "
                f"{type(saved).__name__}; pass a state dict saved by a LocalSGDOptimizer with "
                f"compression={self.spec}, or drop the key (the second residuals then start from zero)")

    @torch.no_grad()
    def load_state(self, entry: dict[str, Any] | None) -> None:
        super().load_state(entry)
        saved = entry.get(SHARD_RESIDUALS_KEY) if isinstance(entry, dict) else None
        for r in self.second:  # saved without them: the second stage starts from zero
            r.zero_()
        self._saved = saved  # with them: used by the next round's prepare, if its shards are theirs


def _shards_of(saved: dict) -> tuple:
    """The (world, rank, shards) a saved second-stage entry belongs to, as :attr:`ReduceScatterReducer._owned`."""
    return (saved["world_size"], saved["rank"], tuple(tuple(s) for s in saved["shards"]))


def _pack(codes: torch.Tensor, bits: int, out: torch.Tensor, spare: torch.Tensor | None = None) -> None:
    """``codes`` (uint8 < 2**bits; a whole number of bytes' worth, zeros past the last code) into ``out``,
    8 // bits per byte, the first in the low bits; ``codes`` is spent.

    The codes of one output byte are one little-endian word (4 bytes at 2 bits, 2 at 4 bits): or-ing
    the word with itself shifted right by ``8 - bits`` (then, at 2 bits, by twice that) brings every
    code next to the first, and the word's low byte is the packed byte. Two or three word-wide ops
    per bucket, in place (the shifted words in ``spare``, at least as many bytes as ``codes``, if given).
    """
    if bits == 8:
        out.copy_(codes[:out.numel()])
        return
    words = codes[:out.numel() * (8 // bits)].view(_WORD[bits])
    for shift in _SHIFTS[bits]:
        words.bitwise_or_(_shifted(torch.bitwise_right_shift, words, shift, spare))
    out.copy_(words.view(torch.uint8).view(-1, 8 // bits)[:, 0])  # the low byte (little-endian)


def _offset(codes: torch.Tensor, bits: int) -> None:
    """Int8 values ``c`` in ``[-h, h)`` (``h = 2**(bits-1)``), in place, into the codes ``c + h``: the low
    ``bits`` bits of ``c`` (two's complement) with the top one flipped, a whole word at a time."""
    words = codes.view(_WORD.get(bits, torch.uint8))
    words.bitwise_and_(_MASK.get(bits, 0xFF)).bitwise_xor_(_HALF[bits])


def _unpack(packed: torch.Tensor, bits: int, out: torch.Tensor, spare: torch.Tensor | None = None) -> None:
    """Every code of ``packed`` into ``out`` (uint8, ``8 // bits`` per byte of ``packed``): :func:`_pack`
    backwards, each byte widened to a word, spread by left shifts (into ``spare`` if given) and masked."""
    if bits == 8:
        out.copy_(packed)
        return
    words = out.view(_WORD[bits])
    words.copy_(packed)
    for shift in reversed(_SHIFTS[bits]):
        words.bitwise_or_(_shifted(torch.bitwise_left_shift, words, shift, spare))
    words.bitwise_and_(_MASK[bits])


def _shifted(shift_op: Any, words: torch.Tensor, shift: int, spare: torch.Tensor | None) -> torch.Tensor:
    """``shift_op(words, shift)``, written into the first bytes of ``spare`` if given (no allocation)."""
    if spare is None:
        return shift_op(words, shift)
    nbytes = words.numel() * words.element_size()
    return shift_op(words, shift, out=spare.view(torch.uint8)[:nbytes].view(words.dtype))


#: the word holding the codes of one packed byte, and the mask of each code's bits in it
_WORD = {2: torch.int32, 4: torch.int16}
_MASK = {2: 0x03030303, 4: 0x0F0F}
_HALF = {2: 0x02020202, 4: 0x0808, 8: 0x80}  # each code's top bit: h = 2**(bits-1)
_SHIFTS = {2: (6, 12), 4: (4,)}  # x | x >> 6, then | >> 12: the four codes at 2 bits
if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("localsgd_optim.rounds.chunked packs low-bit codes as little-endian words")


def _whole_bytes(count: int, bits: int | None) -> int:
    """``count`` codes rounded up to whole bytes of ``bits``-bit codes (codes, not bytes)."""
    per = 8 // (bits or 8)
    return -(-count // per) * per
