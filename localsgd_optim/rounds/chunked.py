"""Top-k and low-bit pseudo-gradients with error feedback: one all-gather per bucket, streamed."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.distributed as dist

from ..compression import STEP_IN_RMS, Compression
from .base import ErrorFeedback, RoundContext

__all__ = ["ChunkedReducer", "RESIDUALS_KEY"]

#: the Local SGD entry's key for the error-feedback residuals (per rank)
RESIDUALS_KEY = "ef_residuals"

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
    ``ceil(fraction * len)`` largest magnitudes of each chunk; ``bits`` quantizes what is kept
    with a per-chunk step (``STEP_IN_RMS[bits]`` times the kept values' root mean square,
    accumulated in float64), levels ``(j - 2**(bits-1) + 1/2) * step``, codes packed 8/bits per
    byte. The residual becomes ``v - sent``. Each rank's payload (steps, values or codes, and
    chunk-relative positions) is one uint8 buffer of a size fixed by the layout, all-gathered
    in one collective per bucket; every rank decodes the payloads one at a time, in rank order,
    adding them into the bucket (top-k: a scatter-add of the kept values), so all ranks get
    bit-identical means. (Dense rounds: ranks 0 and 1 start the sum from the levels they encoded
    themselves instead of decoding their own payload; the first two terms of a sum commute, so
    the sum is the rank-order sum, bit for bit.)

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
        plan = _Plan(numel=n, chunks=len(lengths), runs=runs, starts=as_long(starts), kept=as_long(kept),
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
        padded = max((p.chunks * self.spec.chunk for p in plans), default=0)
        payload = max((p.parts["total"][1] for p in plans), default=0)
        # dense: the codes one byte each in the bucket's layout, padded to whole bytes of the wire
        codes = 0 if self.spec.sparse else max((_whole_bytes(p.numel, self.spec.bits) for p in plans), default=0)
        squares = 0 if self.spec.sparse else max((self._block(p) * self.spec.chunk for p in plans), default=0)
        # a mean accumulates in fp32: in the bucket itself, or (other dtypes) in a buffer of its own
        total = max((b.numel for b in buckets if b.dtype != torch.float32), default=0)
        shape = (world, padded, payload, codes, total, squares)
        if self._shape == shape:
            return
        device = buckets[0].device if buckets else torch.device("cpu")
        self._buffers = {
            "scratch": torch.empty(padded, dtype=torch.float32, device=device),  # the (chunks, chunk) rows
            "codes": torch.zeros(codes, dtype=torch.uint8, device=device),
            "squares": torch.empty(squares, dtype=torch.float64, device=device),
            "total": torch.empty(total, dtype=torch.float32, device=device),
            "mine": torch.zeros(payload, dtype=torch.uint8, device=device),
            "everyone": torch.empty(world * payload, dtype=torch.uint8, device=device),
        }
        for plan in self._plans.values():  # views of the old buffers go with them
            plan._views.clear()
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
        where = [(t.data_ptr(), r.data_ptr()) for t, r in zip(slices, residuals)]
        if where != self._where:  # the deltas or residuals moved: views of the old ones would keep them alive
            for plan in self._plans.values():
                plan._views.clear()
            self._where = where
        for pos, target, residual in zip(positions, slices, residuals):
            plan = self._plan(engine.buckets[pos])
            ctx.sent += self._reduce_bucket(plan, target, residual, group, world, contributors, joined, ctx.weight)

    def _reduce_bucket(self, plan: _Plan, target: torch.Tensor, residual: torch.Tensor, group: Any, world: int,
                       contributors: int, joined: bool, weight: int | None = None) -> int:
        size = plan.parts["total"][1]
        joined = joined or not plan.numel  # (an empty bucket: nothing to build, send or keep)
        if not joined:  # v = delta + feedback * residual, built in the residual (a rank that joined sends zeros)
            self._into_residual(target, residual, self.spec.feedback, self._buffers["total"], weight)
        mine = self._buffers["mine"][:size]
        total = target if target.dtype == torch.float32 else self._buffers["total"][:plan.numel]
        # dense, ranks 0 and 1: the sum starts from this rank's own levels, written by the encode (the first
        # two terms of a sum commute: the same sum as in rank order, bit for bit), one decode fewer
        rank = dist.get_rank(group)
        own = not (self.spec.sparse or joined) and plan.covered and rank < 2
        if self.spec.sparse:
            self._encode_sparse(plan, residual, mine, joined)  # the residual becomes v - sent
        else:
            self._encode_dense(plan, residual, mine, joined, total if own else None)
        if not joined:
            self._out_of_weight(residual, weight)  # (w * v - sent) / w: in this rank's own units
        everyone = self._buffers["everyone"][:world * size]
        self._gather(everyone, mine, group)
        decode = self._decode_sparse(plan) if self.spec.sparse else self._decode_dense
        if not own:
            total.zero_()
        for r in range(world):  # rank order (but for the commuting first two): the same sum on every rank
            if not (own and r == rank):
                decode(plan, everyone[r * size:(r + 1) * size], total)
        total.div_(contributors)
        if total is not target:
            target.copy_(total)
        return size

    # -- top-k ----------------------------------------------------------------------------------

    def _encode_sparse(self, plan: _Plan, v: torch.Tensor, payload: torch.Tensor, joined: bool) -> None:
        """Per chunk, the ``kept`` largest magnitudes of ``v`` (chunk-relative positions) into ``payload``."""
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
            if plan.ragged:  # a short chunk sends its first ``kept`` (the largest)
                top = top.masked_select(torch.arange(plan.kmax, device=v.device) < plan.kept[:, None])
            where = top.view(-1)
            at = plan.starts.index_select(0, rows).add_(where)  # the values' places in the bucket
            values = v.index_select(0, at)
        self._view(payload, plan.parts, "positions").copy_(where)
        sent = self._encode_values(values, rows, plan, payload)
        if not joined:  # residual = v - sent where something was sent, v elsewhere
            v.index_copy_(0, at, values.sub_(sent))

    def _decode_sparse(self, plan: _Plan):  # type: ignore[no-untyped-def]
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
                      levels: torch.Tensor | None = None) -> None:
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

    def _decode_dense(self, plan: _Plan, payload: torch.Tensor, total: torch.Tensor) -> None:
        """One rank's levels ``(code - (h - 1/2)) * step``, added into ``total``."""
        bits, c = self.spec.bits, self.spec.chunk
        assert bits is not None
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
                 "positions": torch.uint8 if self.spec.chunk <= 256 else torch.int16}[name]
        return payload[a:b].view(dtype)


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
