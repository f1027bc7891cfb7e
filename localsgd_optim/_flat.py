"""Persistent flat storage: tensors moved once into one contiguous buffer per (device, dtype).

After the move every resident tensor's ``.data`` is a view of its region's buffer with the
tensor's own shape and strides (channels_last stays channels_last), so a round reduces a
bucket where it lives: a slice of that buffer. Megatron-LM's ``ParamAndGradBuffer`` does the
same for its distributed optimizer, DDP's ``gradient_as_bucket_view`` for gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["Region", "regions", "dense", "strided_views", "bucket_slices", "overlapping", "FlatStorage"]


@dataclass(frozen=True)
class Region:
    """The tensors of one (device, dtype), laid out back to back in list order.

    Attributes:
        device: device of every tensor in the region.
        dtype: dtype of every tensor in the region.
        indices: positions of the region's tensors in the tensor list.
        offsets: element offset of each tensor in the region's buffer.
        numel: total number of elements.
    """

    device: torch.device
    dtype: torch.dtype
    indices: tuple[int, ...]
    offsets: tuple[int, ...]
    numel: int


def regions(tensors: Sequence[torch.Tensor]) -> list[Region]:
    """Group ``tensors`` by (device, dtype) in order of first appearance; offsets follow list order.

    :func:`localsgd_optim._buckets.plan_buckets` groups the same way, so every bucket is a
    contiguous slice of its region.
    """
    members: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        members.setdefault((t.device, t.dtype), []).append(i)
    out = []
    for (device, dtype), indices in members.items():
        offsets, filled = [], 0
        for i in indices:
            offsets.append(filled)
            filled += tensors[i].numel()
        out.append(Region(device, dtype, tuple(indices), tuple(offsets), filled))
    return out


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


def strided_views(buffer: torch.Tensor, region: Region, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Views of ``buffer`` at the region's offsets with each tensor's shape, and its strides if it
    is dense (a tensor that is not gets a contiguous view)."""
    return [buffer.as_strided(tensors[i].shape, tensors[i].stride(), buffer.storage_offset() + off)
            if dense(tensors[i]) else buffer[off:off + tensors[i].numel()].view(tensors[i].shape)
            for i, off in zip(region.indices, region.offsets)]


def bucket_slices(buffers: Sequence[torch.Tensor], regions: Sequence[Region], buckets: Sequence) -> list[torch.Tensor]:
    """Each bucket's slice of its region's buffer (``plan_buckets`` groups like :func:`regions`,
    so a region's buckets tile its buffer in order)."""
    where = {i: (r, off) for r, region in enumerate(regions) for i, off in zip(region.indices, region.offsets)}
    out = []
    for bucket in buckets:
        r, start = where[bucket.indices[0]]
        out.append(buffers[r][start:start + bucket.numel])
    return out


def overlapping(tensors: Sequence[torch.Tensor]) -> set[int]:
    """Indices of the tensors whose memory overlaps another's in the list (e.g. one a slice of another)."""
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


class FlatStorage:
    """One contiguous buffer per (device, dtype) region holding ``tensors``.

    The ``movable`` tensors that are dense and overlap no other become *resident*: their
    values are copied into the buffer once and their ``.data`` rebound to a view of it that
    keeps their strides; from then on the buffer *is* their storage. The others (floating
    buffers, overlapping or non-dense parameters) are *staged*: they keep their storage and
    each round copies them into their slot (:attr:`views`, contiguous) and back.

    Args:
        tensors: the tensors, in a rank-independent order.
        movable: per tensor, whether it may be moved (parameters yes, module buffers no).
    """

    def __init__(self, tensors: Sequence[torch.Tensor], movable: Sequence[bool]) -> None:
        self.regions = regions(tensors)
        shared = overlapping(tensors)
        self.resident = [m and i not in shared and dense(t) for i, (t, m) in enumerate(zip(tensors, movable))]
        self.views: list[torch.Tensor] = [torch.empty(0)] * len(tensors)
        #: per tensor, (region index, element offset in the region's buffer)
        self.where: list[tuple[int, int]] = [(0, 0)] * len(tensors)
        # every buffer first: running out of memory here leaves every tensor where it was
        self.buffers = [torch.empty(r.numel, device=r.device, dtype=r.dtype) for r in self.regions]
        with torch.no_grad():
            for r, (region, buffer) in enumerate(zip(self.regions, self.buffers)):
                for i, off, view in zip(region.indices, region.offsets, strided_views(buffer, region, tensors)):
                    t = tensors[i]
                    self.where[i] = (r, off)
                    if self.resident[i]:
                        view.copy_(t)
                        t.data = view  # the one move: same Parameter object, new storage
                    else:
                        view = buffer[off:off + t.numel()].view(t.shape)  # a contiguous slot
                    self.views[i] = view
        self._residents = [t for t, res in zip(tensors, self.resident) if res]
        self._ptrs = list(map(torch.Tensor.data_ptr, self._residents))

    def moved(self) -> bool:
        """Whether a resident tensor left the storage (``model.to()``, ``.double()``, ``p.data = ...``).

        One ``data_ptr()`` per tensor, mapped in C: about 30 us for 576 parameters.
        """
        return list(map(torch.Tensor.data_ptr, self._residents)) != self._ptrs

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)
