"""One layout: tensors laid back to back in one flat buffer per (device, dtype), buckets as slices.

Every strategy asks this one index map for "the bytes of these tensors": the engine's
persistent storage (parameters moved in once, Megatron-LM's ``ParamAndGradBuffer`` does the
same), the global copy of an outer optimizer, an overlapped round's in-flight buffer, int8's
residuals. A :class:`Span` is a run of same-(device, dtype) tensors: a *region* (a whole
buffer) or a *bucket* (a slice of one). Inside a buffer a tensor that is dense keeps its own
strides (channels_last stays channels_last); one that is not, or that is not resident
(staged: a module buffer, a parameter sharing memory with another), gets a contiguous slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

__all__ = ["Span", "regions", "plan_buckets", "dense", "overlapping", "Layout", "FlatStorage", "rebase"]


@dataclass(frozen=True)
class Span:
    """Same-(device, dtype) tensors laid back to back: a whole region's buffer, or a bucket of it.

    Attributes:
        device: device of every tensor in the span.
        dtype: dtype of every tensor in the span.
        indices: positions of the span's tensors in the tensor list.
        offsets: element offset of each tensor from the span's start.
        numel: total number of elements.
        region: index of the region (buffer) the span lies in.
        start: element offset of the span in its region's buffer (0 for a region).
    """

    device: torch.device
    dtype: torch.dtype
    indices: tuple[int, ...]
    offsets: tuple[int, ...]
    numel: int
    region: int = 0
    start: int = 0


def regions(tensors: Sequence[torch.Tensor]) -> list[Span]:
    """Group ``tensors`` by (device, dtype) in order of first appearance; offsets follow list order."""
    members: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        members.setdefault((t.device, t.dtype), []).append(i)
    out = []
    for r, ((device, dtype), indices) in enumerate(members.items()):
        offsets, filled = [], 0
        for i in indices:
            offsets.append(filled)
            filled += tensors[i].numel()
        out.append(Span(device, dtype, tuple(indices), tuple(offsets), filled, r))
    return out


def plan_buckets(tensors: Sequence[torch.Tensor], cap_bytes: int, breaks: Sequence[int] = ()) -> list[Span]:
    """Split each region of ``tensors`` into buckets of at most ``cap_bytes`` bytes, in list order.

    A tensor larger than the cap gets a bucket of its own. Every tensor lands in exactly one
    bucket (the planner advances by what it packed, never by capacity), and a region's buckets
    tile its buffer in order. No bucket holds tensors from both sides of an index in ``breaks``
    (a fragment boundary), so any ``[lo, hi)`` range between breaks is a run of whole buckets.

    Args:
        tensors: the tensors to pack; only their device, dtype and numel are read.
        cap_bytes: the largest bucket, in bytes (>= 1).
        breaks: tensor indices that start a new bucket.
    """
    if cap_bytes < 1:
        raise ValueError(f"cap_bytes must be >= 1, got {cap_bytes!r}")
    cuts = set(breaks)
    buckets: list[Span] = []
    for region in regions(tensors):
        cap_elems = max(1, cap_bytes // torch.empty((), dtype=region.dtype).element_size())
        run: list[tuple[int, int]] = []  # (index, offset in the region) of the open bucket
        filled = 0
        for i, off in zip(region.indices, region.offsets):
            n = tensors[i].numel()
            if run and (filled + n > cap_elems or any(run[-1][0] < c <= i for c in cuts)):
                buckets.append(_bucket(region, run, filled))
                run, filled = [], 0
            run.append((i, off))
            filled += n
        if run:
            buckets.append(_bucket(region, run, filled))
    return buckets


def _bucket(region: Span, run: list[tuple[int, int]], numel: int) -> Span:
    start = run[0][1]
    return Span(region.device, region.dtype, tuple(i for i, _ in run), tuple(off - start for _, off in run),
                numel, region.region, start)


def dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements tile a block of memory exactly once (any dimension order)."""
    if t.numel() == 0:
        return True
    expected = 1
    for size, stride in sorted(((s, st) for s, st in zip(t.shape, t.stride()) if s != 1), key=lambda x: x[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def overlapping(tensors: Sequence[torch.Tensor]) -> set[int]:
    """Indices of the tensors whose memory overlaps another's in the list (a view, or the same tensor twice)."""
    spans: dict[tuple[torch.device, int], list[tuple[int, int, int]]] = {}
    for i, t in enumerate(tensors):
        if t.numel() == 0:
            continue
        start = t.data_ptr()
        end = start + t.element_size() * (1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride())))
        spans.setdefault((t.device, t.untyped_storage().data_ptr()), []).append((start, end, i))
    out: set[int] = set()
    for intervals in spans.values():
        intervals.sort()
        reach, owner = -1, -1
        for start, end, i in intervals:
            if start < reach:
                out.update((i, owner))
            if end > reach:
                reach, owner = end, i
    return out


class Layout:
    """Where each tensor of a list lives in flat buffers: the one index map every strategy uses.

    Args:
        tensors: the tensors, in a rank-independent order.
        movable: per tensor, whether it may live in the buffer (parameters yes, module buffers
            no). A movable tensor that is dense and overlaps no other is *resident*: its view keeps
            its strides. The others are *staged*: a contiguous slot they are copied into and out of.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], movable: Sequence[bool]) -> None:
        self.regions = regions(tensors)
        self._tensors = list(tensors)
        self.shared = shared = overlapping(tensors)
        self.resident = [m and i not in shared and dense(t) for i, (t, m) in enumerate(zip(tensors, movable))]
        self.shapes = [(t.shape, t.stride() if res and t.numel() else None) for t, res in zip(tensors, self.resident)]
        #: per tensor, (region index, element offset in the region's buffer)
        self.where: list[tuple[int, int]] = [(0, 0)] * len(tensors)
        for region in self.regions:
            for i, off in zip(region.indices, region.offsets):
                self.where[i] = (region.region, off)

    def shared_tensors(self) -> list[torch.Tensor]:
        """The tensors that share memory with another in the list."""
        return [self._tensors[i] for i in sorted(self.shared)]

    def allocate(self) -> list[torch.Tensor]:
        """Fresh (uninitialized) buffers, one per region."""
        return [torch.empty(r.numel, device=r.device, dtype=r.dtype) for r in self.regions]

    def views(self, buffers: Sequence[torch.Tensor], lo: int = 0, hi: int | None = None) -> list[torch.Tensor]:
        """Each tensor's view of ``buffers``: its shape, and its strides if resident."""
        out = []
        for i in range(lo, len(self.where) if hi is None else hi):
            r, off = self.where[i]
            shape, stride = self.shapes[i]
            buf = buffers[r]
            n = shape.numel()
            out.append(buf.as_strided(shape, stride, buf.storage_offset() + off) if stride is not None
                       else buf[off:off + n].view(shape))
        return out

    def extent(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """``(region, start, end)`` per region holding tensors ``[lo, hi)``, in region order.

        Tensors of one region lie in list order, so a contiguous index range is one slice of each.
        """
        ends: dict[int, list[int]] = {}
        for i in range(lo, hi):
            r, off = self.where[i]
            n = self.shapes[i][0].numel()
            if r in ends:
                ends[r][1] = off + n
            else:
                ends[r] = [off, off + n]
        return [(r, a, b) for r, (a, b) in sorted(ends.items())]

    def slices(self, buffers: Sequence[torch.Tensor], lo: int, hi: int) -> list[torch.Tensor]:
        """Per region, the slice of ``buffers`` holding tensors ``[lo, hi)``."""
        return [buffers[r][a:b] for r, a, b in self.extent(lo, hi)]

    def key(self, lo: int, hi: int) -> tuple:
        """What another layout must share to line up with tensors ``[lo, hi)`` element for element."""
        # regions numbered by their place among the range's slices (as :meth:`slices` lists them)
        base = {r: (k, a) for k, (r, a, _) in enumerate(self.extent(lo, hi))}
        return tuple((base[r][0], off - base[r][1], self.shapes[i]) for i, (r, off) in enumerate(self.where[lo:hi], lo))


def _set_data(t: torch.Tensor, view: torch.Tensor) -> None:
    t.data = view


def rebase(views: Sequence[torch.Tensor], old: Sequence[torch.Tensor], new: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The views ``views`` of buffers ``old``, re-made on buffers ``new`` of the same sizes."""
    where = {(b.device, b.dtype): (b, n) for b, n in zip(old, new)}  # one buffer per (device, dtype)
    out = []
    for v in views:
        b, n = where[(v.device, v.dtype)]
        out.append(n.as_strided(v.shape, v.stride(), n.storage_offset() + v.storage_offset() - b.storage_offset()))
    return out


class FlatStorage:
    """The buffers of a :class:`Layout`, holding ``tensors``.

    Resident tensors are copied into the buffers once and their ``.data`` rebound to their
    view: from then on the buffer *is* their storage. Staged tensors keep their storage and a
    round copies them into their slot (:meth:`stage_in`) and back (:meth:`stage_out`), once
    per round each, so tensors that share memory all read their values before any is written.

    Args:
        tensors: the tensors, in a rank-independent order.
        movable: per tensor, whether it may be moved (``False`` everywhere: a staging copy that
            moves nothing, for the copy engine's outer rounds).
        move: ``move(tensor, view)`` re-points a tensor at its view (default: ``tensor.data = view``;
            a sharded parameter's shard re-points FSDP's references too: see :mod:`._sharded`).
    """

    def __init__(self, tensors: Sequence[torch.Tensor], movable: Sequence[bool],
                 move: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> None:
        self.move = move or _set_data
        self.layout = layout = Layout(tensors, movable)
        self.resident = layout.resident
        # every buffer first: running out of memory here leaves every tensor where it was
        self.buffers = layout.allocate()
        self.views = layout.views(self.buffers)
        with torch.no_grad():
            for t, view, res in zip(tensors, self.views, self.resident):
                if res:
                    view.copy_(t)
                    self.move(t, view)  # the one move: same Parameter object, new storage
        self._residents = [t for t, res in zip(tensors, self.resident) if res]
        self._ptrs = list(map(torch.Tensor.data_ptr, self._residents))
        self._staged: dict[tuple[int, int], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self._tensors = list(tensors)

    def residents(self) -> list[torch.Tensor]:
        return list(self._residents)

    @torch.no_grad()
    def evict(self, keep: Sequence[torch.Tensor], shared: Sequence[torch.Tensor] = ()) -> None:
        """Give every resident not in ``keep`` that still lives here storage of its own (a parameter
        frozen, or staged now), so these buffers are freed once the new storage replaces them.

        Tensors in ``shared`` (sharing memory with another now) are left where they are: cloned
        one by one they would stop sharing it.
        """
        kept = set(map(id, keep)) | set(map(id, shared))
        mine = {b.untyped_storage().data_ptr() for b in self.buffers}
        for t in self._residents:
            if id(t) not in kept and t.untyped_storage().data_ptr() in mine:
                self.move(t, t.data.clone(memory_format=torch.preserve_format))

    def restage(self, tensors: Sequence[torch.Tensor]) -> None:
        """Staged tensors were rebound (a module buffer reassigned): stage the new objects."""
        self._tensors = list(tensors)
        self._staged.clear()

    def _pairs(self, lo: int, hi: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        found = self._staged.get((lo, hi))
        if found is None:
            found = self._staged[(lo, hi)] = (
                [t for t, res in zip(self._tensors[lo:hi], self.resident[lo:hi]) if not res],
                [v for v, res in zip(self.views[lo:hi], self.resident[lo:hi]) if not res])
        return found

    @torch.no_grad()
    def stage_in(self, lo: int = 0, hi: int | None = None) -> None:
        """Copy the staged tensors of ``[lo, hi)`` into their slots (one ``_foreach_copy_``)."""
        members, slots = self._pairs(lo, len(self._tensors) if hi is None else hi)
        if members:
            torch._foreach_copy_(slots, members)

    @torch.no_grad()
    def stage_out(self, lo: int = 0, hi: int | None = None) -> None:
        """Copy the slots of the staged tensors of ``[lo, hi)`` back out (one ``_foreach_copy_``).

        Tensors that share memory are written one by one, in list order, after the others: their
        slots may differ in the last bit (reduced in different buckets), and a multi-tensor kernel
        writing overlapping memory concurrently would let a different one win on each rank.
        """
        hi = len(self._tensors) if hi is None else hi
        members, slots = self._pairs(lo, hi)
        if not members:
            return
        shared = self.layout.shared
        if not shared:
            torch._foreach_copy_(members, slots)
            return
        alone = [i for i in range(lo, hi) if not self.resident[i] and i not in shared]
        if alone:
            torch._foreach_copy_([self._tensors[i] for i in alone], [self.views[i] for i in alone])
        for i in sorted(j for j in shared if lo <= j < hi):
            self._tensors[i].copy_(self.views[i])

    def staged_tensors(self) -> list[torch.Tensor]:
        return self._pairs(0, len(self._tensors))[0]

    def moved(self) -> bool:
        """Whether a resident tensor left the storage (``model.to()``, ``.double()``, ``p.data = ...``).

        One ``data_ptr()`` per tensor, mapped in C: about 30 us for 576 parameters.
        """
        return list(map(torch.Tensor.data_ptr, self._residents)) != self._ptrs

    def first_moved(self) -> bool:
        """Whether the first resident tensor left: one ``data_ptr()``, cheap enough for every step.

        ``model.to()`` and ``model.half()`` move every parameter, the first included.
        """
        return bool(self._residents) and self._residents[0].data_ptr() != self._ptrs[0]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)
