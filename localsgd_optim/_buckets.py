"""The communication engine: flat, bucketed, in-place collectives over a fixed tensor list.

This module knows *how* to move tensors, never *when*: the schedule lives in
:mod:`localsgd_optim._schedule` and the optimizer wrapper composes the two.
"""

from __future__ import annotations

import math
import operator
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from ._flat import FlatStorage, bucket_slices, regions

__all__ = ["Bucket", "plan_buckets", "bucket_views", "mean_op", "BucketEngine", "layout_key", "first_nonfinite"]


@dataclass(frozen=True)
class Bucket:
    """A run of same-(device, dtype) tensors packed back to back into one flat buffer.

    Attributes:
        device: device of every tensor in the bucket.
        dtype: dtype of every tensor in the bucket.
        indices: positions of the bucket's tensors in the engine's tensor list.
        offsets: element offset of each tensor inside the flat buffer.
        numel: total number of elements packed.
    """

    device: torch.device
    dtype: torch.dtype
    indices: tuple[int, ...]
    offsets: tuple[int, ...]
    numel: int


def plan_buckets(tensors: Sequence[torch.Tensor], cap_bytes: int) -> list[Bucket]:
    """Split ``tensors`` into buckets of at most ``cap_bytes`` bytes each.

    Tensors are grouped by (device, dtype) in order of first appearance and then
    packed greedily in their original order. A tensor larger than the cap gets a
    bucket of its own. Every tensor lands in exactly one bucket: the planner
    advances by what it packed, never by capacity.

    Args:
        tensors: the tensors to pack; only their device, dtype and numel are read.
        cap_bytes: the largest bucket, in bytes (>= 1).
    """
    if cap_bytes < 1:
        raise ValueError(f"cap_bytes must be >= 1, got {cap_bytes!r}")
    buckets: list[Bucket] = []
    for region in regions(tensors):  # the (device, dtype) grouping flat storage uses
        device, dtype = region.device, region.dtype
        itemsize = torch.empty((), dtype=dtype).element_size()
        cap_elems = max(1, cap_bytes // itemsize)
        indices: list[int] = []
        offsets: list[int] = []
        filled = 0
        for i in region.indices:
            n = tensors[i].numel()
            if indices and filled + n > cap_elems:
                buckets.append(Bucket(device, dtype, tuple(indices), tuple(offsets), filled))
                indices, offsets, filled = [], [], 0
            indices.append(i)
            offsets.append(filled)
            filled += n
        if indices:
            buckets.append(Bucket(device, dtype, tuple(indices), tuple(offsets), filled))
    return buckets


def bucket_views(flat: torch.Tensor, bucket: Bucket, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Views of ``flat`` (a bucket's buffer) shaped like the bucket's ``tensors``, at their offsets."""
    return [flat[off:off + tensors[i].numel()].view_as(tensors[i]) for i, off in zip(bucket.indices, bucket.offsets)]


def mean_op(group: dist.ProcessGroup | None, contributors: int) -> tuple[dist.ReduceOp, int | None]:
    """How to average over ``contributors`` ranks of ``group``: ``(op, divisor)``.

    NCCL reduces with ``AVG`` natively when every rank contributes; gloo and MPI have no
    ``AVG``, and ranks that joined send zeros: then ``SUM`` and divide by ``divisor``.
    """
    if contributors == dist.get_world_size(group) and dist.get_backend(group) == "nccl":
        return dist.ReduceOp.AVG, None
    return dist.ReduceOp.SUM, contributors


def foreach_copy(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    torch._foreach_copy_(dst, src)


class _Slot:
    """One reusable flat buffer plus the views that map a bucket's tensors onto it."""

    __slots__ = ("buffer", "views")

    def __init__(self, buffer: torch.Tensor) -> None:
        self.buffer = buffer
        # bucket position -> views of ``buffer`` shaped like that bucket's tensors
        self.views: dict[int, list[torch.Tensor]] = {}


# A collective takes the flat tensor to reduce and returns its async work handle.
Collective = Callable[[torch.Tensor], "dist.Work"]
# A finisher runs on the flat tensor after its collective completed (e.g. a scale).
Finisher = Callable[[torch.Tensor], None]

_WIDE = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.complex32: torch.complex64}


class BucketEngine:
    """Runs one collective per bucket over a fixed list of tensors, in place.

    With ``flat_params`` (the default of :class:`~localsgd_optim.LocalSGDOptimizer`) the
    first ``movable`` tensors (the parameters) are moved once into persistent flat storage
    (:class:`~localsgd_optim._flat.FlatStorage`) and every bucket is a slice of it: a round
    reduces each bucket where it lives, one collective and at most one ``div_`` per bucket,
    nothing packed. Tensors that cannot live there (module buffers, overlapping or non-dense
    parameters) are staged: copied into their slot of the storage before the collective and
    back after, one ``_foreach_copy_`` per bucket each way.

    Without it (the copy engine) tensors keep their storage: each (device, dtype) group owns
    two persistent flat buffers (double buffering: bucket ``i + 1`` is packed while bucket
    ``i`` is on the wire), so extra memory is at most two buckets, and results are copied
    back. A bucket holding a single contiguous tensor is reduced in that tensor.

    A wire dtype (``torch.bfloat16``) always goes through the double-buffered slots: each
    bucket is cast into one and widened back.

    Args:
        tensors: the tensors to operate on (e.g. every parameter), in a rank-independent order.
        bucket_cap_bytes: the largest bucket, in bytes.
        flat_params: move the first ``movable`` tensors into flat storage.
        movable: how many leading tensors may be moved (default: all).
    """

    def __init__(self, tensors: Sequence[torch.Tensor], bucket_cap_bytes: int, flat_params: bool = False,
                 movable: int | None = None) -> None:
        self.cap_bytes = bucket_cap_bytes
        self.flat_params = flat_params
        self.movable = len(tensors) if movable is None else movable
        self._plan(list(tensors))

    def _plan(self, tensors: list[torch.Tensor]) -> None:
        # Everything is built first and assigned last: if the storage cannot be allocated (out
        # of memory), nothing has moved and the engine still describes the old plan.
        buckets = plan_buckets(tensors, self.cap_bytes)
        storage = FlatStorage(tensors, [i < self.movable for i in range(len(tensors))]) \
            if self.flat_params else None
        self.tensors, self.buckets, self.storage = tensors, buckets, storage
        # Per bucket: the flat tensor reduced in place (a storage slice, or a lone contiguous
        # tensor), or None (packed into a slot); and the staged members copied in and out of it.
        self._direct: list[torch.Tensor | None] = (
            list(bucket_slices(storage.buffers, storage.regions, buckets)) if storage is not None
            else [self._lone_contiguous(b) for b in buckets])
        self._restage()
        # (device, tensor dtype, wire dtype or None) -> the two reusable buffers of that group
        self._slots: dict[tuple[torch.device, torch.dtype, torch.dtype | None], list[_Slot]] = {}
        self._flats: dict[int, tuple[tuple, list[torch.Tensor]]] = {}

    def _restage(self) -> None:
        """Which staged tensors each bucket copies in and out (flat storage only)."""
        self._stage: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = [([], []) for _ in self.buckets]
        if self.storage is not None:
            for (members, views), bucket in zip(self._stage, self.buckets):
                for i in bucket.indices:
                    if not self.storage.resident[i]:
                        members.append(self.tensors[i])
                        views.append(self.storage.views[i])
        self._storage = self._signature()

    def _lone_contiguous(self, bucket: Bucket) -> torch.Tensor | None:
        if len(bucket.indices) == 1:
            t = self.tensors[bucket.indices[0]]
            if t.is_contiguous():
                return t.view(-1)
        return None

    def _only_staged_rebound(self, tensors: Sequence[torch.Tensor]) -> bool:
        """Whether ``tensors`` differs from ours only in staged tensors of the same layout (a module
        buffer reassigned by its forward, or rebound by ``module.to()`` on the same device)."""
        if self.storage is None or len(tensors) != len(self.tensors) or self.storage.moved():
            return False
        return all(new is old if res else (new.shape, new.dtype, new.device) == (old.shape, old.dtype, old.device)
                   for new, old, res in zip(tensors, self.tensors, self.storage.resident))

    def _signature(self) -> list[tuple[int, torch.Size, torch.dtype]]:
        # With flat storage only the staged tensors are read here; residents are checked by pointer.
        if self.storage is None:
            return [(t.data_ptr(), t.shape, t.dtype) for t in self.tensors]
        return [(t.data_ptr(), t.shape, t.dtype) for members, _ in self._stage for t in members]

    def prepare(self, wire_dtype: torch.dtype | None = None) -> None:
        """Allocate every buffer a round needs now, so nothing can fail locally mid-round."""
        for bucket, direct in zip(self.buckets, self._direct):
            if direct is None or wire_dtype is not None:
                self._slots_for(bucket, wire_dtype)

    def refresh(self, tensors: Sequence[torch.Tensor] | None = None) -> bool:
        """Re-plan if the tensors changed or any storage moved (``model.to(...)``, ``p.data = ...``).

        ``tensors`` is the current list (buffers are rebound objects after ``module.to``).
        With flat storage, re-planning moves the parameters into new storage. Returns whether
        it re-planned. Cheap: identity and ``data_ptr`` per tensor, no device work.
        """
        if tensors is not None and (len(tensors) != len(self.tensors)
                                    or not all(map(operator.is_, tensors, self.tensors))):
            if self._only_staged_rebound(tensors):  # the parameters stay where they are
                self.tensors = list(tensors)
                self._restage()
                return True
            self._plan(list(tensors))
        elif self._signature() == self._storage and (self.storage is None or not self.storage.moved()):
            return False
        else:
            self._plan(self.tensors)
        return True

    @property
    def numel(self) -> int:
        return sum(b.numel for b in self.buckets)

    @property
    def nbytes(self) -> int:
        return sum(b.numel * torch.empty((), dtype=b.dtype).element_size() for b in self.buckets)

    def buffer_bytes(self) -> int:
        """Bytes held by the persistent packing buffers (allocated at first use); not the flat storage."""
        return sum(s.buffer.numel() * s.buffer.element_size() for ss in self._slots.values() for s in ss)

    def flats(self, count: int) -> tuple[tuple, list[torch.Tensor]] | None:
        """The flat storage of the first ``count`` tensors, one slice per region, with their layout key.

        ``None`` unless all of them are resident. The key (device, dtype, shape, strides per
        tensor) tells whether another flat layout (a global copy) matches element for element.
        """
        if self.storage is None or not all(self.storage.resident[:count]) or self.storage.moved():
            return None  # (moved: until the next round re-plans, the parameters are elsewhere)
        found = self._flats.get(count)
        if found is None:  # computed once per plan: the key is O(tensors) to build
            ends: dict[int, int] = {}
            for i in range(count):
                region, off = self.storage.where[i]
                ends[region] = off + self.tensors[i].numel()
            found = self._flats[count] = (layout_key(self.tensors[:count]),
                                          [self.storage.buffers[r][:n] for r, n in sorted(ends.items())])
        return found

    def _slots_for(self, bucket: Bucket, wire_dtype: torch.dtype | None = None) -> list[_Slot]:
        key = (bucket.device, bucket.dtype, wire_dtype)
        slots = self._slots.get(key)
        if slots is None:
            # Size for the largest bucket of this group that goes through a buffer (with a
            # wire dtype, every bucket does: the in-place path cannot change dtype).
            sizes = [
                b.numel for b, direct in zip(self.buckets, self._direct)
                if (b.device, b.dtype) == key[:2] and (direct is None or wire_dtype is not None)
            ]
            size, count = max(sizes), min(2, len(sizes))
            slots = [
                _Slot(torch.empty(size, device=bucket.device, dtype=wire_dtype or bucket.dtype))
                for _ in range(count)
            ]
            self._slots[key] = slots
        return slots

    def _views(self, slot: _Slot, pos: int) -> list[torch.Tensor]:
        views = slot.views.get(pos)
        if views is None:
            views = slot.views[pos] = bucket_views(slot.buffer, self.buckets[pos], self.tensors)
        return views

    def _members(self, pos: int) -> list[torch.Tensor]:
        return [self.tensors[i] for i in self.buckets[pos].indices]

    def _stage_in(self, pos: int) -> None:
        members, views = self._stage[pos]
        if members:
            foreach_copy(views, members)

    def _stage_out(self, pos: int) -> None:
        members, views = self._stage[pos]
        if members:
            foreach_copy(members, views)

    # -- a bucket at a time, for benchmarks and tests (the round itself is :meth:`run`) ---------

    def staged(self) -> list[int]:
        """Positions of the buckets that copy tensors in and out (a packing buffer or staged members)."""
        return [pos for pos, direct in enumerate(self._direct) if direct is None or self._stage[pos][0]]

    def buffer_dtypes(self) -> list[torch.dtype]:
        """The dtypes of the packing buffers allocated so far (a wire dtype shows up here)."""
        return sorted({s.buffer.dtype for slots in self._slots.values() for s in slots}, key=str)

    def flat(self, pos: int) -> torch.Tensor:
        """What a collective reduces for bucket ``pos``: its storage, or its packing buffer."""
        direct = self._direct[pos]
        return direct if direct is not None else self._slots_for(self.buckets[pos])[0].buffer[:self.buckets[pos].numel]

    def pack(self, pos: int) -> None:
        """Copy bucket ``pos``'s staged tensors into what :meth:`flat` returns."""
        if self._direct[pos] is not None:
            self._stage_in(pos)
        else:
            foreach_copy(self._views(self._slots_for(self.buckets[pos])[0], pos), self._members(pos))

    def unpack(self, pos: int, divide_by: int) -> None:
        """Divide what :meth:`flat` returns by ``divide_by``, then copy staged tensors back out."""
        self.flat(pos).div_(divide_by)
        if self._direct[pos] is not None:
            self._stage_out(pos)
        else:
            foreach_copy(self._members(pos), self._views(self._slots_for(self.buckets[pos])[0], pos))

    @torch.no_grad()
    def first_nonfinite(self) -> int:
        """Index of this rank's first tensor holding NaN/Inf, or -1.

        With flat storage, one ``sum`` per bucket (its storage slice: one memory pass, the
        fastest reduction on CPU); with the copy engine one ``_foreach_norm`` per (device,
        dtype) over the tensors. NaN and +-Inf propagate into either (a max would miss -Inf).
        Narrow dtypes accumulate in fp32: an fp16 sum overflows at 65504 on healthy values.
        One host sync per device. Only when something is not finite is the culprit looked up,
        tensor by tensor.
        """
        per_device: dict[torch.device, list[torch.Tensor]] = {}
        if self.storage is not None:
            for pos, flat in enumerate(self._direct):
                self._stage_in(pos)
                per_device.setdefault(flat.device, []).append(flat.sum(dtype=_WIDE.get(flat.dtype)))  # type: ignore
        else:
            groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
            for t in self.tensors:
                groups.setdefault((t.device, t.dtype), []).append(t)
            for (device, dtype), ts in groups.items():
                per_device.setdefault(device, []).extend(torch._foreach_norm(ts, 2, dtype=_WIDE.get(dtype)))
        if all(bool(torch.stack(found).isfinite().all()) for found in per_device.values()):
            return -1
        return first_nonfinite(self.tensors)

    @torch.no_grad()
    def run(self, collective: Collective, finish: Finisher | None = None, divide_by: int | None = None,
            send_zeros: bool = False, wire_dtype: torch.dtype | None = None) -> int:
        """Apply ``collective`` (then ``finish``) to every bucket and write the results back.

        Returns the bytes handed to collectives (the payload this rank sent).

        Collectives are issued asynchronously in bucket order, identically on every
        rank, with at most two packing buffers per (device, dtype) in flight. ``divide_by``
        divides each bucket's result with one ``div_``. ``send_zeros`` contributes zeros
        instead of the tensors (a rank that has joined), and still receives the result.
        ``wire_dtype`` (e.g. ``torch.bfloat16``) casts each bucket on its way into a packing
        buffer and back: the collective moves fewer bytes, at that dtype's precision; the
        division happens after widening, at full precision.
        """
        pending: deque[tuple[int, torch.Tensor, _Slot | None, dist.Work]] = deque()
        busy: set[int] = set()
        sent = 0

        def complete_oldest() -> None:
            pos, flat, slot, work = pending.popleft()
            work.wait()
            if finish is not None:
                finish(flat)
            direct = self._direct[pos]
            if slot is not None and direct is not None:  # cast for the wire: widen back in place
                direct.copy_(flat)
                busy.discard(id(slot))
                slot, flat = None, direct
            if slot is None:
                if divide_by is not None:
                    flat.div_(divide_by)
                self._stage_out(pos)
                return
            members, views = self._members(pos), self._views(slot, pos)
            if slot.buffer.dtype == self.buckets[pos].dtype:
                if divide_by is not None:
                    flat.div_(divide_by)
                foreach_copy(members, views)
            else:  # a narrower wire dtype: widen first, divide at full precision
                foreach_copy(members, views)
                if divide_by is not None:
                    torch._foreach_div_(members, divide_by)
            busy.discard(id(slot))

        try:
            for pos, bucket in enumerate(self.buckets):
                direct = self._direct[pos]
                if direct is not None and not send_zeros:
                    self._stage_in(pos)
                if direct is not None and wire_dtype is None:
                    flat, slot = direct, None
                    if send_zeros:
                        flat.zero_()  # reduced in place: the result overwrites it anyway
                else:
                    slots = self._slots_for(bucket, wire_dtype)
                    while all(id(s) in busy for s in slots):
                        complete_oldest()
                    slot = next(s for s in slots if id(s) not in busy)
                    busy.add(id(slot))
                    flat = slot.buffer[:bucket.numel]
                    if send_zeros:
                        flat.zero_()
                    elif direct is not None:
                        flat.copy_(direct)
                    else:
                        foreach_copy(self._views(slot, pos), self._members(pos))
                pending.append((pos, flat, slot, collective(flat)))
                sent += flat.numel() * flat.element_size()
            while pending:
                complete_oldest()
            return sent
        finally:
            # On an error, let in-flight collectives finish before the buffers are reused.
            for _, _, _, work in pending:
                try:
                    work.wait()
                except Exception:  # noqa: BLE001 - the first error is the one to report
                    pass

    def all_reduce_mean(self, group: dist.ProcessGroup | None, world_size: int,
                        contributors: int | None = None, send_zeros: bool = False,
                        wire_dtype: torch.dtype | None = None) -> int:
        """Replace every tensor by its mean across the ranks of ``group``; return the bytes sent.

        With ``contributors < world_size`` (ranks that joined send zeros), the sum is
        divided by the number of contributors instead.
        """
        op, divisor = mean_op(group, world_size if contributors is None else contributors)
        return self.run(lambda flat: dist.all_reduce(flat, op, group, async_op=True),
                 divide_by=divisor, send_zeros=send_zeros, wire_dtype=wire_dtype)

    def broadcast(self, src: int, group: dist.ProcessGroup | None) -> int:
        """Overwrite every tensor with its value on global rank ``src``."""
        return self.run(lambda flat: dist.broadcast(flat, src, group, async_op=True))


def layout_key(tensors: Sequence[torch.Tensor]) -> tuple:
    """What two flat layouts must share to line up element for element."""
    return tuple((t.device, t.dtype, t.shape, t.stride()) for t in tensors)


@torch.no_grad()
def first_nonfinite(tensors: Sequence[torch.Tensor]) -> int:
    """Index of the first tensor holding NaN/Inf, or -1: one reduction per tensor (the slow path).

    A sum propagates NaN and +-Inf (a max would miss -Inf).
    """
    for i, t in enumerate(tensors):
        if not bool(t.sum(dtype=_WIDE.get(t.dtype)).isfinite()):
            return i
    return -1


def bucket_cap_bytes(bucket_cap_mb: float) -> int:
    """Convert a cap in MiB to bytes (at least one byte)."""
    return max(1, int(math.floor(bucket_cap_mb * 1024 * 1024)))
