"""Properties of the bucket planner and engine (hypothesis), over a real one-rank gloo group."""

from __future__ import annotations

import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from localsgd_optim._buckets import BucketEngine
from localsgd_optim._flat import plan_buckets

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]

shapes = st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple)
specs = st.lists(st.tuples(shapes, st.sampled_from(DTYPES), st.booleans()), min_size=1, max_size=25)
caps = st.integers(1, 2000)


def _make(spec):
    tensors = []
    for i, (shape, dtype, transposed) in enumerate(spec):
        t = (torch.arange(max(1, torch.Size(shape).numel()), dtype=torch.float64) + 1000 * i)[: torch.Size(shape).numel()]
        t = t.reshape(shape).to(dtype)
        if transposed and t.dim() == 2:
            t = t.t()  # non-contiguous: must still round-trip
        tensors.append(t)
    return tensors


@settings(max_examples=200, deadline=None)
@given(specs, caps)
def test_plan_covers_every_element_exactly_once(spec, cap_bytes):
    tensors = _make(spec)
    buckets = plan_buckets(tensors, cap_bytes)
    seen = sorted(i for b in buckets for i in b.indices)
    assert seen == list(range(len(tensors)))
    for b in buckets:
        itemsize = torch.empty((), dtype=b.dtype).element_size()
        assert all(tensors[i].dtype == b.dtype and tensors[i].device == b.device for i in b.indices)
        # tensors sit back to back, and only a lone tensor may exceed the cap
        expected = 0
        for i, off in zip(b.indices, b.offsets):
            assert off == expected
            expected += tensors[i].numel()
        assert b.numel == expected
        assert len(b.indices) == 1 or b.numel * itemsize <= max(cap_bytes, itemsize)
    # same-(device, dtype) tensors keep their relative order
    for b in buckets:
        assert list(b.indices) == sorted(b.indices)


_PG = None


def _gloo_one_rank():
    global _PG
    if _PG is None:
        _PG = dist.ProcessGroupGloo(dist.HashStore(), 0, 1)
    return _PG


@settings(max_examples=150, deadline=None)
@given(specs, caps)
def test_engine_round_trip_touches_every_element_once(spec, cap_bytes):
    pg = _gloo_one_rank()
    tensors = _make(spec)
    before = [t.clone() for t in tensors]
    ptrs = [t.data_ptr() for t in tensors]
    engine = BucketEngine(tensors, cap_bytes)

    # A real gloo all-reduce over one rank is the identity; the collective first triples each bucket.
    # An element packed twice would come back x9, one dropped would come back x1.
    def collective(flat):
        flat.mul_(3)
        return pg.allreduce([flat])

    expected = before
    for _ in range(2):  # buffers are reused across rounds
        engine.run(collective)
        expected = [e * 3 for e in expected]  # same dtype, same rounding as the engine's mul_
        for t, e in zip(tensors, expected):
            assert torch.equal(t, e)
    assert [t.data_ptr() for t in tensors] == ptrs
    # double buffering: at most two buffers per (device, dtype), each the size of the largest
    # bucket that goes through a buffer (a packed bucket is <= cap; a lone non-contiguous
    # tensor may be larger): extra memory <= 2 buckets
    staged = [engine.buckets[pos] for pos in engine.packed()]
    groups = {(b.device, b.dtype) for b in staged}
    largest = {key: max(b.numel * b.dtype.itemsize for b in staged if (b.device, b.dtype) == key) for key in groups}
    assert engine.buffer_bytes() <= sum(2 * size for size in largest.values())


def test_large_contiguous_tensor_is_reduced_in_place():
    pg = _gloo_one_rank()
    big, small_a, small_b = torch.ones(1000), torch.ones(3), torch.ones(2)
    engine = BucketEngine([big, small_a, small_b], bucket_cap_bytes=400)
    engine.run(lambda flat: pg.allreduce([flat]))
    assert [len(b.indices) for b in engine.buckets] == [1, 2]
    assert engine.packed() == [1]  # the big tensor is reduced where it lives
    assert engine.buffer_bytes() == 5 * 4  # one slot, sized for the packed bucket only


def test_plan_rejects_bad_cap():
    import pytest

    with pytest.raises(ValueError, match="cap_bytes must be >= 1, got 0"):
        plan_buckets([torch.ones(2)], 0)
