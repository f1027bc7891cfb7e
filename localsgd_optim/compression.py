"""Sparse and low-bit pseudo-gradients with error feedback: the settings.

``compression=topk(0.01, bits=2)`` is the SparseLoCo recipe: per chunk of ``chunk`` elements
of each tensor, the largest ``fraction`` by magnitude travel, quantized to ``bits``, with their
positions in the chunk; ``compression=quantize(2)`` (or ``"int2"``, ``"int4"``) quantizes every
element. What is not sent stays in a per-rank residual and is added to the next round's delta
(error feedback). The reducer is :mod:`localsgd_optim.rounds.chunked`; dense quantization can also
travel as a reduce-scatter of the codes (``quantize(4, collective="reduce_scatter")``), for many ranks.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable

from ._schedule import _is_int

__all__ = ["Compression", "topk", "quantize", "STEP_IN_RMS", "MAX_CHUNK", "COLLECTIVES"]

#: bits -> quantization step in units of the chunk's root mean square (near the step of the
#: MSE-optimal uniform quantizer of a Gaussian: 0.996, 0.335, 0.031 sigma)
STEP_IN_RMS: dict[int, float] = {2: 1.0, 4: 0.3375, 8: 1 / 32}
#: positions within a chunk travel as int16 (uint8 up to 256 elements)
MAX_CHUNK = 32768
#: how the codes travel: every rank's payload to every rank (all-gather), or a reduce-scatter of the
#: codes then an all-gather of the requantized mean shards (dense quantization only)
COLLECTIVES = ("all_gather", "reduce_scatter")


@dataclass(frozen=True)
class Compression:
    """How pseudo-gradients are compressed: build it with :func:`topk` or :func:`quantize`.

    Attributes:
        fraction: the share of each chunk sent (its largest by magnitude); 1: every element.
        bits: the values' width on the wire: 2, 4 or 8 (a per-chunk step), or ``None`` (fp32).
        chunk: elements per chunk; chunks never cross a tensor (a tensor's last may be shorter).
        feedback: the residual's decay: ``v = delta + feedback * residual`` is what is compressed.
        collective: ``"all_gather"`` (every rank decodes every payload) or ``"reduce_scatter"``
            (dense quantization only: each rank decodes 1/W of every payload, requantizes its mean
            shard with a second residual, and the shards are all-gathered; see :func:`quantize`).
    """

    fraction: float = 1.0
    bits: int | None = None
    chunk: int = 4096
    feedback: float = 1.0
    collective: str = "all_gather"

    def __post_init__(self) -> None:
        f = self.fraction
        if isinstance(f, bool) or not isinstance(f, numbers.Real) or not (0 < f <= 1):
            raise ValueError(f"topk: fraction must be a number in (0, 1] (0.01: 1% of each chunk), got {f!r}")
        if self.bits is not None and (not _is_int(self.bits) or self.bits not in STEP_IN_RMS):
            raise ValueError(
                f"bits must be 2, 4 or 8 (None: fp32 values), got {self.bits!r}; for 16 bits use compression='bf16'"
            )
        if self.bits is None and f == 1:
            raise ValueError(
                "topk(1.0) without bits sends every element at full precision plus its position: pass "
                "compression=None, or a fraction below 1, or bits"
            )
        if not _is_int(self.chunk) or not 1 <= self.chunk <= MAX_CHUNK:
            raise ValueError(
                f"chunk must be an integer in [1, {MAX_CHUNK}] (positions travel as int16), got {self.chunk!r}"
            )
        fb = self.feedback
        if isinstance(fb, bool) or not isinstance(fb, numbers.Real) or not (0 <= fb <= 1):
            raise ValueError(
                f"feedback must be a number in [0, 1] (1: classic error feedback, 0: none), got {fb!r}"
            )
        if self.collective not in COLLECTIVES:
            raise ValueError(
                f"collective must be 'all_gather' or 'reduce_scatter', got {self.collective!r}")
        if self.collective == "reduce_scatter" and (self.sparse or self.bits is None):
            raise ValueError(
                f"collective='reduce_scatter' needs dense quantization (fraction 1, bits 2, 4 or 8), got "
                f"fraction={f!r}, bits={self.bits!r}: top-k payloads carry positions, so the mean of a shard "
                "is no longer top-k; use quantize(bits, collective='reduce_scatter'), or collective='all_gather'")
        object.__setattr__(self, "fraction", float(f))
        object.__setattr__(self, "feedback", float(fb))
        object.__setattr__(self, "chunk", int(self.chunk))

    @property
    def sparse(self) -> bool:
        return self.fraction < 1

    def per_chunk(self, length: int) -> int:
        """Elements sent from a chunk of ``length`` elements: ``ceil(fraction * length)``."""
        return min(length, math.ceil(self.fraction * length - 1e-9)) if length else 0

    def __str__(self) -> str:
        return self._describe(lambda x: f"{x:g}")

    def settings(self) -> str:
        """What ranks must agree on, exactly: the floats by ``repr`` (which round-trips), then what the
        fraction derives, the values sent per chunk.

        ``str()`` keeps six digits (``:g``): ``topk(0.1, chunk=10)`` and ``topk(0.1000001, chunk=10)`` print
        alike, yet send 1 and 2 values per chunk, and ranks that sent different sizes would crash in the
        all-gather. ``"int4"`` and ``quantize(4)`` give the same string: they are the same compressor.
        """
        text = self._describe(repr)
        if not self.sparse:
            return text
        n = self.per_chunk(self.chunk)
        return f"{text}: {n} value{'' if n == 1 else 's'} per chunk of {self.chunk}"

    def _describe(self, number: Callable[[float], str]) -> str:
        fb = "" if self.feedback == 1 else f", feedback={number(self.feedback)}"
        if self.collective != "all_gather":
            fb += f", collective={self.collective!r}"
        if self.sparse:
            return f"topk({number(self.fraction)}, bits={self.bits}, chunk={self.chunk}{fb})"
        return f"quantize({self.bits}, chunk={self.chunk}{fb})"


def topk(fraction: float, *, bits: int | None = None, chunk: int = 4096, feedback: float = 1.0) -> Compression:
    """Send the largest ``fraction`` of each chunk (by magnitude), at ``bits`` bits (``None``: fp32).

    Per chunk, ``ceil(fraction * chunk)`` values and their positions in the chunk (uint8 up to
    256 elements, else int16); with ``bits`` a per-chunk fp32 step too. Of equal magnitudes the
    earliest is kept (on the CPU, by the compiled kernels; the eager path, on CUDA or without a
    C compiler, orders ties as ``torch.topk`` does). With error feedback, what
    is not sent this round is added to the next one's delta. ``topk(0.01, bits=2)`` is SparseLoCo's
    setting (Sarfi et al., 2025).
    """
    return Compression(fraction=fraction, bits=bits, chunk=chunk, feedback=feedback)


def quantize(bits: int, *, chunk: int = 4096, feedback: float = 1.0,
             collective: str = "all_gather") -> Compression:
    """Send every element at ``bits`` bits (2 or 4; 8 also works), with a per-chunk fp32 step.

    Uniform levels ``(j - 2**(bits-1) + 1/2) * step`` with ``step = STEP_IN_RMS[bits] * rms(chunk)``:
    values past the outer levels are clipped, and error feedback carries the clipping and the
    rounding to the next round.

    ``collective="reduce_scatter"`` (ZeRO++'s qgZ, Wang et al. 2023, https://arxiv.org/abs/2306.10209;
    the compressed all-reduce of 1-bit Adam, Tang et al. 2021, https://arxiv.org/abs/2102.02888): each
    bucket's codes are cut into W chunk-aligned shards and an all-to-all sends shard j to rank j, which
    decodes its W shards, sums them in rank order, divides, requantizes the mean shard with a second
    residual of its own and all-gathers it. Each rank then decodes one payload's worth, not W; the mean
    is quantized twice (see :class:`~localsgd_optim.rounds.chunked.ReduceScatterReducer`).
    """
    if bits is None:
        raise ValueError("quantize: bits must be 2, 4 or 8, got None")
    return Compression(fraction=1.0, bits=bits, chunk=chunk, feedback=feedback, collective=collective)


#: compression strings that are chunked compressors
NAMED = {"int4": quantize(4), "int2": quantize(2)}
