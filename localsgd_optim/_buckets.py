"""The communication engine: flat, bucketed, in-place collectives over a fixed tensor list.

This module knows *how* to move tensors, never *when*: the schedule lives in
:mod:`localsgd_optim._schedule` and the optimizer wrapper composes the two. Where tensors
live is :mod:`localsgd_optim._flat`'s one layout; every strategy reduces slices of it.
"""

from __future__ import annotations

import math
import operator
from collections import deque
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from ._flat import FlatStorage, Span, overlapping, plan_buckets

__all__ = ["mean_op", "BucketEngine", "InFlight", "first_nonfinite", "bucket_cap_bytes", "WIDE"]

#: Narrow dtypes a reduction accumulates in (an fp16 sum overflows at 65504 on healthy values).
WIDE = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.complex32: torch.complex64}


def mean_op(group: dist.ProcessGroup | None, contributors: int,
            weight: int | None = None) -> tuple[dist.ReduceOp, int | None]:
    """How to average over ``contributors`` ranks of ``group``: ``(op, divisor)``.

    NCCL reduces with ``AVG`` natively when every rank contributes; gloo and MPI have no
    faster ``AVG``, and ranks that joined send zeros: then ``SUM`` and divide by ``divisor``.
    A weighted mean (``weight``: this rank's) always sums; ``contributors`` is then the total weight.
    """
    if weight is None and contributors == dist.get_world_size(group) and dist.get_backend(group) == "nccl":
        return dist.ReduceOp.AVG, None
    return dist.ReduceOp.SUM, contributors


def foreach_copy(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    if dst:  # (torch's foreach ops refuse an empty list: a model with nothing to average)
        torch._foreach_copy_(dst, src)


# A collective takes the flat tensor to reduce and returns its async work handle.
Collective = Callable[[torch.Tensor], "dist.Work"]


class _Slots:
    """Two reusable buffers for the buckets of one (device, dtype), in that dtype or a wire dtype:
    bucket ``i + 1`` is packed while ``i`` is on the wire."""

    def __init__(self, numel: int, device: torch.device, dtype: torch.dtype, count: int) -> None:
        self.buffers = [torch.empty(numel, device=device, dtype=dtype) for _ in range(count)]
        self.free = list(range(count))
        self._views: dict[tuple[int, int], list[torch.Tensor]] = {}  # (buffer, bucket) -> member views

    def views(self, index: int, pos: int, members: list[torch.Tensor]) -> list[torch.Tensor]:
        """Views of buffer ``index`` shaped like bucket ``pos``'s ``members``, back to back (made once)."""
        found = self._views.get((index, pos))
        if found is None:
            found = self._views[(index, pos)] = _views(self.buffers[index], members)
        return found


class BucketEngine:
    """Runs one collective per bucket over a fixed list of tensors, in place.

    With ``flat_params`` the first ``movable`` tensors (the parameters) are moved once into
    persistent flat storage (:class:`~localsgd_optim._flat.FlatStorage`) and every bucket is a
    slice of it: a round copies the staged tensors (module buffers, parameters sharing memory)
    into their slots once, reduces each bucket where it lives, divides once per buffer and
    copies the staged tensors back once: O(buckets) work, nothing packed.

    Without it (the copy engine) tensors keep their storage: a plain round packs each bucket
    into one of two persistent buffers per (device, dtype) (bucket ``i + 1`` is packed while
    ``i`` is on the wire; a bucket that is one contiguous tensor sharing memory with no other
    is reduced in that tensor). Rounds that compute on the flat layout (outer rounds, int8,
    overlap) get a staging copy of it (:meth:`storage_for_rounds`), built once per plan.

    Args:
        tensors: the tensors to operate on (e.g. every parameter), in a rank-independent order.
        bucket_cap_bytes: the largest bucket, in bytes.
        flat_params: move the first ``movable`` tensors into flat storage.
        movable: how many leading tensors may be moved (default: all).
        breaks: tensor indices no bucket straddles (fragment boundaries).
        evict: when a re-plan leaves a tensor out of the storage (a parameter frozen, or sharing
            memory now), give it storage of its own, so the old buffer is freed: for tensors that
            stay in use after they leave (parameters; not a replaced optimizer state).
        sharding: the :class:`~localsgd_optim._sharded.Sharding` of sharded parameters, whose local
            shards are moved by re-pointing FSDP's references too, or stay staged (the copy path).
    """

    def __init__(self, tensors: Sequence[torch.Tensor], bucket_cap_bytes: int, flat_params: bool = False,
                 movable: int | None = None, breaks: Sequence[int] = (), evict: bool = False,
                 sharding: Any = None) -> None:
        self.cap_bytes = bucket_cap_bytes
        self.sharding = sharding
        self.evict = evict
        self.flat_params = flat_params
        self.movable = len(tensors) if movable is None else movable
        self.breaks = tuple(breaks)
        self._plan(list(tensors))

    def _plan(self, tensors: list[torch.Tensor]) -> None:
        # Everything is built first and assigned last: if the storage cannot be allocated (out
        # of memory), nothing has moved and the engine still describes the old plan.
        buckets = plan_buckets(tensors, self.cap_bytes, self.breaks)
        movable = [i < self.movable for i in range(len(tensors))]
        move = None
        if self.sharding is not None and self.flat_params:
            move, staged = self.sharding.placement()
            movable = [m and id(t) not in staged for m, t in zip(movable, tensors)]
        storage = FlatStorage(tensors, movable, move) if self.flat_params else None
        if self.evict and self.__dict__.get("storage") is not None:  # (tensors that leave stay in use)
            self.storage.evict(storage.residents() if storage is not None else [],
                               storage.layout.shared_tensors() if storage is not None else [])
        self.tensors, self.buckets, self.storage = tensors, buckets, storage
        self._staging: FlatStorage | None = None  # the copy engine's flat layout, built on demand
        shared = overlapping(tensors) if storage is None else set()
        # copy engine: per bucket, the lone contiguous tensor reduced in place, or None (packed)
        self._direct: list[torch.Tensor | None] = [
            tensors[b.indices[0]].view(-1) if storage is None and len(b.indices) == 1
            and b.indices[0] not in shared and tensors[b.indices[0]].is_contiguous() else None
            for b in buckets]
        self._slots: dict[tuple[torch.device, torch.dtype], _Slots] = {}
        self._keys: dict[tuple[int, int], tuple[tuple, list[torch.Tensor]]] = {}
        self._slices: dict[tuple, list[torch.Tensor]] = {}  # bucket slices, per range and buffers
        self._stale = False
        self._signature_now = self._signature()

    def release(self) -> None:
        """Drop every buffer: the tensors left the storage (``model.half()``, ``model.cpu()``).

        Called at the step that detects the move, so the old storage is freed then, not at the
        next round. The next :meth:`refresh` re-plans.
        """
        self.storage = self._staging = None
        self._direct = [None] * len(self.buckets)
        self._slots, self._keys, self._slices = {}, {}, {}
        self._stale = True

    def moved_cheap(self) -> bool:
        """Whether the whole model moved (one ``data_ptr()``: cheap enough for every step)."""
        return self.storage is not None and self.storage.first_moved()

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
        return [(t.data_ptr(), t.shape, t.dtype) for t in self.storage.staged_tensors()]

    def refresh(self, tensors: Sequence[torch.Tensor] | None = None) -> bool:
        """Re-plan if the tensors changed or any storage moved (``model.to(...)``, ``p.data = ...``).

        ``tensors`` is the current list (buffers are rebound objects after ``module.to``).
        With flat storage, re-planning moves the parameters into new storage. Returns whether
        it re-planned. Cheap: identity and ``data_ptr`` per tensor, no device work.
        """
        if self._stale:
            self._plan(list(self.tensors if tensors is None else tensors))
        elif tensors is not None and (len(tensors) != len(self.tensors)
                                      or not all(map(operator.is_, tensors, self.tensors))):
            if self._only_staged_rebound(tensors):  # the parameters stay where they are
                self.tensors = list(tensors)
                assert self.storage is not None
                self.storage.restage(self.tensors)
                self._signature_now = self._signature()
                return True
            self._plan(list(tensors))
        elif self._signature() == self._signature_now and (self.storage is None or not self.storage.moved()):
            return False
        else:
            self._plan(self.tensors)
        return True

    @property
    def numel(self) -> int:
        return sum(b.numel for b in self.buckets)

    @property
    def nbytes(self) -> int:
        return sum(b.numel * b.dtype.itemsize for b in self.buckets)

    def buffer_bytes(self) -> int:
        """Bytes held by packing buffers and the copy engine's staging copy; not the flat storage."""
        slots = sum(b.numel() * b.element_size() for s in self._slots.values() for b in s.buffers)
        return slots + (self._staging.nbytes if self._staging is not None else 0)

    def packed(self) -> list[int]:
        """Positions of the buckets a plain round of the copy engine packs into a buffer (the others
        are one contiguous tensor, reduced where it lives; with flat storage, none is packed)."""
        return [pos for pos, direct in enumerate(self._direct) if self.storage is None and direct is None]

    def buffer_dtypes(self) -> list[torch.dtype]:
        """The dtypes of the packing buffers allocated so far (a wire dtype shows up here)."""
        return sorted({b.dtype for s in self._slots.values() for b in s.buffers}, key=str)

    # -- the flat layout, for rounds that compute on it ------------------------------------------

    def storage_for_rounds(self) -> FlatStorage:
        """The flat storage; for the copy engine, a staging copy of the same layout (built once per plan)."""
        if self.storage is not None:
            return self.storage
        if self._staging is None:
            self._staging = FlatStorage(self.tensors, [False] * len(self.tensors))
            self._keys.clear()
        return self._staging

    def flats(self, lo: int = 0, hi: int | None = None) -> tuple[tuple, list[torch.Tensor]]:
        """Per region, the slice of the flat layout holding tensors ``[lo, hi)``, with its layout key.

        The key tells whether another flat layout (a global copy) lines up element for element.
        """
        hi = len(self.tensors) if hi is None else hi
        found = self._keys.get((lo, hi))
        if found is None:  # computed once per plan: O(tensors)
            storage = self.storage_for_rounds()
            found = self._keys[(lo, hi)] = (storage.layout.key(lo, hi), storage.layout.slices(storage.buffers, lo, hi))
        return found

    def views(self, lo: int = 0, hi: int | None = None) -> list[torch.Tensor]:
        """Each tensor's view in the flat layout (its slot), for tensors ``[lo, hi)``."""
        return self.storage_for_rounds().views[lo:hi]

    def stage_in(self, lo: int = 0, hi: int | None = None) -> None:
        self.storage_for_rounds().stage_in(lo, hi)

    def stage_out(self, lo: int = 0, hi: int | None = None) -> None:
        self.storage_for_rounds().stage_out(lo, hi)

    def bucket_range(self, lo: int, hi: int) -> list[int]:
        """Positions of the buckets holding tensors ``[lo, hi)`` (whole buckets: see ``breaks``)."""
        return [pos for pos, b in enumerate(self.buckets) if lo <= b.indices[0] < hi]

    def bucket_slices(self, buffers: Sequence[torch.Tensor], lo: int, hi: int) -> list[torch.Tensor]:
        """Each bucket of ``[lo, hi)`` as a slice of ``buffers`` laid out like :meth:`flats` ``(lo, hi)``."""
        cache = (lo, hi, *map(torch.Tensor.data_ptr, buffers))
        found = self._slices.get(cache)
        if found is None:  # once per plan and set of buffers
            extent = self.storage_for_rounds().layout.extent(lo, hi)
            base = {r: (k, a) for k, (r, a, _) in enumerate(extent)}
            found = self._slices[cache] = []
            for pos in self.bucket_range(lo, hi):
                b = self.buckets[pos]
                k, a = base[b.region]
                found.append(buffers[k][b.start - a:b.start - a + b.numel])
        return found

    def prepare(self, wire_dtype: torch.dtype | None = None, flat: bool = False) -> None:
        """Allocate every buffer a round needs now, so nothing can fail locally mid-round."""
        if flat:
            self.storage_for_rounds()
        if wire_dtype is not None or (self.storage is None and not flat):
            for pos in range(len(self.buckets)):
                if wire_dtype is not None or self._direct[pos] is None:
                    self._slots_for(self.buckets[pos], wire_dtype)

    def _slots_for(self, bucket: Span, wire_dtype: torch.dtype | None = None) -> _Slots:
        key = (bucket.device, bucket.dtype, wire_dtype)
        slots = self._slots.get(key)
        if slots is None:
            # Sized for the largest bucket of this (device, dtype) that goes through a buffer (with
            # a wire dtype, every bucket does: the in-place path cannot change dtype).
            sizes = [b.numel for b, direct in zip(self.buckets, self._direct)
                     if (b.device, b.dtype) == key[:2] and (direct is None or wire_dtype is not None)] or [bucket.numel]
            slots = self._slots[key] = _Slots(max(sizes), bucket.device, wire_dtype or bucket.dtype,
                                              min(2, len(sizes)))
        return slots

    # -- the NaN scan ----------------------------------------------------------------------------

    @torch.no_grad()
    def first_nonfinite(self) -> int:
        """Index of this rank's first tensor holding NaN/Inf, or -1.

        One ``sum`` per flat buffer (a region: one memory pass, fused however many buckets it
        has), staged tensors copied in first; the copy engine, one ``_foreach_norm`` per (device,
        dtype). NaN and +-Inf propagate into either (a max would miss -Inf); narrow dtypes
        accumulate in fp32. Only when something is not finite is the culprit looked up, tensor
        by tensor (a sum that overflowed on finite values finds none: then -1).
        """
        if self.storage is not None:
            self.storage.stage_in()
            sums = [b.sum(dtype=WIDE.get(b.dtype)) for b in self.storage.buffers]  # type: ignore[call-overload]
        else:
            groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
            for t in self.tensors:
                groups.setdefault((t.device, t.dtype), []).append(t)
            # one value per group: a sum of norms (>= 0: no cancellation) propagates NaN and Inf
            sums = [torch.stack(torch._foreach_norm(ts, 2, dtype=WIDE.get(dtype))).sum() for (_, dtype), ts in groups.items()]
        if all(math.isfinite(s.item()) if not s.is_complex() else bool(s.isfinite()) for s in sums):
            return -1
        return first_nonfinite(self.tensors)

    # -- a round -----------------------------------------------------------------------------------

    @torch.no_grad()
    def run(self, collective: Collective, divide_by: int | None = None,
            send_zeros: bool = False, wire_dtype: torch.dtype | None = None, lo: int = 0, hi: int | None = None,
            buffers: Sequence[torch.Tensor] | None = None, weight: int | None = None) -> int:
        """Apply ``collective`` to every bucket of tensors ``[lo, hi)``, in place.

        Returns the bytes handed to collectives (the payload this rank sent).

        ``buffers`` (laid out like :meth:`flats` ``(lo, hi)``: an outer round's deltas, an
        overlapped round's in-flight copy) are reduced instead of the tensors. Without them,
        the flat storage is reduced, its staged tensors copied in before and out after; the
        copy engine packs. Collectives are issued asynchronously in bucket order, identically
        on every rank. ``divide_by`` divides the result: once per flat buffer. ``send_zeros``
        contributes zeros (a rank that has joined) and receives the result. ``wire_dtype``
        (``torch.bfloat16``) casts each bucket on its way into a packing buffer and back; the
        division happens after widening, at full precision. ``weight`` multiplies this rank's
        contribution first (a weighted mean: ``divide_by`` is then the total weight).
        """
        hi = len(self.tensors) if hi is None else hi
        if buffers is None and self.storage is None:
            return self._run_packed(collective, divide_by, send_zeros, wire_dtype, lo, hi, weight)
        own = buffers is None
        if own:
            buffers = self.flats(lo, hi)[1]
            if not send_zeros:
                self.stage_in(lo, hi)
        assert buffers is not None
        if send_zeros:
            for b in buffers:
                b.zero_()  # reduced in place: the result overwrites it anyway
        elif weight is not None:
            torch._foreach_mul_(list(buffers), weight)
        sent = self._reduce_slices(self.bucket_slices(buffers, lo, hi), collective, wire_dtype)
        if divide_by is not None:
            for b in buffers:
                b.div_(divide_by)
        if own:
            self.stage_out(lo, hi)
        return sent

    def _reduce_slices(self, slices: list[torch.Tensor], collective: Collective, wire_dtype: torch.dtype | None) -> int:
        """One collective per slice, in place, or through a packing buffer of ``wire_dtype``."""

        def complete(target: torch.Tensor, flat: torch.Tensor, slots: _Slots | None, index: int) -> None:
            if slots is not None:
                target.copy_(flat)  # widen back in place
                slots.free.append(index)

        with _Pipeline(complete) as pipe:
            for target in slices:
                slots, index, flat = None, 0, target
                if wire_dtype is not None:
                    slots = self._slots_for(Span(target.device, target.dtype, (), (), target.numel()), wire_dtype)
                    index = pipe.acquire(slots)
                    flat = slots.buffers[index][:target.numel()]
                    flat.copy_(target)
                pipe.launch((target, flat, slots, index), flat, collective)
            return pipe.complete_all()

    def _run_packed(self, collective: Collective, divide_by: int | None,
                    send_zeros: bool, wire_dtype: torch.dtype | None, lo: int, hi: int,
                    weight: int | None = None) -> int:
        """The copy engine's round: each bucket packed into a double buffer (or reduced in its lone tensor)."""

        def complete(pos: int, members: list[torch.Tensor], flat: torch.Tensor, slots: _Slots | None,
                     index: int) -> None:
            if slots is None:
                if divide_by is not None:
                    flat.div_(divide_by)
                return
            if flat.dtype == members[0].dtype and divide_by is not None:
                flat.div_(divide_by)
            foreach_copy(members, slots.views(index, pos, members))
            if flat.dtype != members[0].dtype and divide_by is not None:  # widened first: divide at full precision
                torch._foreach_div_(members, divide_by)
            slots.free.append(index)

        with _Pipeline(complete) as pipe:
            for pos in self.bucket_range(lo, hi):
                bucket, direct = self.buckets[pos], self._direct[pos]
                members = [self.tensors[i] for i in bucket.indices]
                slots, index = None, 0
                if direct is not None and wire_dtype is None:
                    flat = direct
                else:
                    slots = self._slots_for(bucket, wire_dtype)
                    index = pipe.acquire(slots)
                    flat = slots.buffers[index][:bucket.numel]
                if send_zeros:
                    flat.zero_()
                elif slots is not None:
                    foreach_copy(slots.views(index, pos, members), members)
                if weight is not None and not send_zeros:
                    flat.mul_(weight)  # (a lone tensor reduced in place: it is overwritten by the mean)
                pipe.launch((pos, members, flat, slots, index), flat, collective)
            return pipe.complete_all()

    def all_reduce_mean(self, group: dist.ProcessGroup | None, world_size: int,
                        contributors: int | None = None, send_zeros: bool = False,
                        wire_dtype: torch.dtype | None = None, lo: int = 0, hi: int | None = None,
                        buffers: Sequence[torch.Tensor] | None = None, weight: int | None = None) -> int:
        """Replace tensors ``[lo, hi)`` (or ``buffers``) by their mean across ``group``; return the bytes sent.

        The one SUM-then-divide of the package. With ``contributors < world_size`` (ranks that
        joined send zeros), the sum is divided by the number of contributors instead. With
        ``weight`` (this rank's), the mean is weighted: ``sum(weight_r * x_r) / contributors``,
        ``contributors`` being the total weight.
        """
        contributors = world_size if contributors is None else contributors
        # a wire dtype sums narrow and divides after widening, at full precision (not NCCL's AVG in bf16)
        op, divisor = mean_op(group, contributors, weight) if wire_dtype is None else (dist.ReduceOp.SUM, contributors)
        return self.run(lambda flat: dist.all_reduce(flat, op, group, async_op=True), divide_by=divisor,
                        send_zeros=send_zeros, wire_dtype=wire_dtype, lo=lo, hi=hi, buffers=buffers, weight=weight)

    def start_mean(self, group: dist.ProcessGroup | None, world_size: int, contributors: int,
                   buffers: Sequence[torch.Tensor], lo: int, hi: int) -> "InFlight":
        """Phase one of a two-phase mean of ``buffers`` (laid out like :meth:`flats` ``(lo, hi)``):
        one asynchronous all-reduce per bucket; :meth:`InFlight.wait` completes and divides."""
        op, divisor = mean_op(group, contributors)
        slices = self.bucket_slices(buffers, lo, hi) if contributors else []  # every rank joined: nothing
        return InFlight.start(group, op, slices, buffers, divisor)

    def broadcast(self, src: int, group: dist.ProcessGroup | None) -> int:
        """Overwrite every tensor with its value on global rank ``src``."""
        return self.run(lambda flat: dist.broadcast(flat, src, group, async_op=True))


class InFlight:
    """An overlapped mean on the wire: :meth:`wait` completes its collectives and divides, once."""

    __slots__ = ("works", "buffers", "divisor", "sent")

    def __init__(self, works: list, buffers: list[torch.Tensor], divisor: int | None, sent: int) -> None:
        self.works, self.buffers, self.divisor, self.sent = works, buffers, divisor, sent

    @classmethod
    def start(cls, group: dist.ProcessGroup | None, op: dist.ReduceOp, slices: Sequence[torch.Tensor],
              buffers: Sequence[torch.Tensor], divisor: int | None) -> "InFlight":
        """One asynchronous all-reduce per slice (the buckets, views of ``buffers``)."""
        works = [dist.all_reduce(s, op, group, async_op=True) for s in slices]
        return cls(works, list(buffers), divisor, sum(s.numel() * s.element_size() for s in slices))

    @torch.no_grad()
    def wait(self) -> None:
        works, self.works = self.works, []
        for w in works:
            w.wait()
        if works and self.divisor not in (None, 1):
            for b in self.buffers:
                b.div_(self.divisor)


def _views(flat: torch.Tensor, members: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of a packing buffer shaped like ``members``, back to back."""
    out, off = [], 0
    for t in members:
        out.append(flat[off:off + t.numel()].view(t.shape))
        off += t.numel()
    return out


class _Pipeline:
    """Collectives in flight, completed oldest first (``complete(*item)`` after each one's wait).

    On an error, the collectives still in flight are waited for before their buffers are reused.
    """

    def __init__(self, complete: Callable[..., None]) -> None:
        self._complete = complete
        self._pending: deque[tuple[tuple, Any]] = deque()
        self.sent = 0

    def launch(self, item: tuple, flat: torch.Tensor, collective: Collective) -> None:
        self._pending.append((item, collective(flat)))
        self.sent += flat.numel() * flat.element_size()

    def acquire(self, slots: _Slots) -> int:
        """A free packing buffer of ``slots``, completing the oldest collective until one is."""
        while not slots.free:
            self._complete_oldest()
        return slots.free.pop(0)

    def _complete_oldest(self) -> None:
        item, work = self._pending.popleft()
        work.wait()
        self._complete(*item)

    def complete_all(self) -> int:
        while self._pending:
            self._complete_oldest()
        return self.sent

    def __enter__(self) -> "_Pipeline":
        return self

    def __exit__(self, *exc: Any) -> None:
        for _, work in self._pending:
            try:
                work.wait()
            except Exception:  # noqa: BLE001 - the first error is the one to report
                pass


@torch.no_grad()
def first_nonfinite(tensors: Sequence[torch.Tensor]) -> int:
    """Index of the first tensor holding NaN/Inf, or -1: one reduction per tensor (the slow path).

    A sum propagates NaN and +-Inf (a max would miss -Inf).
    """
    for i, t in enumerate(tensors):
        if not bool(t.sum(dtype=WIDE.get(t.dtype)).isfinite()):
            return i
    return -1


def bucket_cap_bytes(bucket_cap_mb: float) -> int:
    """Convert a cap in MiB to bytes (at least one byte)."""
    return max(1, int(math.floor(bucket_cap_mb * 1024 * 1024)))
