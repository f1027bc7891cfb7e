"""Zero-copy rounds: parameters live in flat storage, a round costs O(buckets) operations.

The op count of a round is deterministic (the same on every device), so it is asserted here;
its time is only ever measured by ``python -m localsgd_optim.bench``. Every other test checks
that the parameters moved into flat storage still behave as the user's parameters: averaged
exactly as the one-by-one reference averages them, never moved again, and re-flattened when
the user moves or casts the model.
"""

from __future__ import annotations

import collections

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import assert_same, make_batches, make_model, mse, params_of, train_wrapped
from localsgd_optim import LocalSGDOptimizer
from localsgd_optim.bench import build_model
from reference import average_one_by_one, reference_rounds


class CountOps(TorchDispatchMode):
    """Counts every op dispatched (collectives included), by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def storage_ptrs(params) -> list[int]:
    return [p.data_ptr() for p in params]


# -- the op count of one round: O(buckets), not O(parameters) --------------------------------

def _count_round_ops(flat_params, check_finite):
    torch.manual_seed(0)
    model = build_model(48, 128)  # 576 parameter tensors, 36 MB: 2 buckets of 25 MB
    params = list(model.parameters())
    opt = LocalSGDOptimizer(torch.optim.SGD(params, lr=0.0), k=1 << 30, flat_params=flat_params,
                            check_finite=check_finite)
    opt.sync()  # allocate what a round keeps
    with CountOps() as counter:
        opt.sync()
    return len(opt.engine.buckets), len(params), dict(counter.ops)


@pytest.mark.parametrize("flat_params", [True, False], ids=["flat", "copy-engine"])
@pytest.mark.parametrize("check_finite", [True, False], ids=["nan-guard", "no-guard"])
def test_round_dispatches_a_bounded_number_of_ops_per_bucket(ranks2, flat_params, check_finite):
    # The copy engine at df781d9 dispatched 1170 ops for one sync() of this model (576 sum, 576 div);
    # the code at cb26ab6, 18 with flat storage (a sum and a div_ per bucket, a gather into per-rank outputs).
    for buckets, tensors, ops in ranks2(_count_round_ops, flat_params, check_finite):
        assert buckets == 2 and tensors == 576
        total = sum(ops.values())
        assert ops.get("allreduce_", 0) == buckets, ops  # one collective per bucket
        if flat_params:  # nothing packed: no copies at all, one sum and one div_ per flat buffer
            assert total <= buckets + (6 if check_finite else 4), ops
            assert not any("copy" in name for name in ops), ops
            assert ops.get("div_", 0) == 1 and ops.get("sum", 0) == (1 if check_finite else 0), ops
        else:  # the copy engine packs: a copy in and out per packed bucket
            assert total <= 5 * buckets + 8, ops


# -- the storage promise ---------------------------------------------------------------------

def _storage_stays_put():
    torch.manual_seed(0)
    model = make_model(seed=dist.get_rank())
    params = list(model.parameters())
    before_bind = storage_ptrs(params)
    opt = LocalSGDOptimizer(torch.optim.AdamW(params, lr=1e-2), k=2, bucket_cap_mb=0.01)
    after_bind = storage_ptrs(params)
    one_buffer = len({p.untyped_storage().data_ptr() for p in params})
    for x, y in make_batches(6):
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()
        assert storage_ptrs(params) == after_bind  # steps and rounds never move a parameter
    opt.sync()
    assert storage_ptrs(params) == after_bind
    # moved into flat storage: one contiguous buffer, in parameter order
    offsets = [p.data_ptr() - after_bind[0] for p in params]
    expected = [0]
    for p in params[:-1]:
        expected.append(expected[-1] + p.numel() * p.element_size())
    return before_bind != after_bind, one_buffer, offsets == expected, opt.engine.buffer_bytes()


def test_parameters_move_once_into_one_buffer_and_never_again(ranks2):
    for moved, storages, in_order, packing_bytes in ranks2(_storage_stays_put):
        assert moved and storages == 1 and in_order
        assert packing_bytes == 0  # no packing buffers: every bucket is reduced where it lives


def _copy_engine_keeps_storage():
    model = make_model(seed=dist.get_rank())
    params = list(model.parameters())
    before = storage_ptrs(params)
    opt = LocalSGDOptimizer(torch.optim.SGD(params, lr=0.05), k=2, bucket_cap_mb=0.01, flat_params=False)
    train_wrapped(model, opt, make_batches(4))
    return before == storage_ptrs(params)


def test_flat_params_false_keeps_each_parameter_storage(ranks2):
    assert all(ranks2(_copy_engine_keeps_storage))


# -- parity with the one-by-one reference, for what flat storage must handle -------------------

class Mixed(nn.Module):
    """channels_last conv, a tied weight, mixed dtypes, a BatchNorm (staged buffers), an empty tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
        self.bn = nn.BatchNorm2d(4)
        self.embed = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 10)
        self.head.weight = self.embed.weight  # tied: one parameter, listed once
        self.wide = nn.Parameter(torch.randn(5, dtype=torch.float64))
        self.empty = nn.Parameter(torch.zeros(0))

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.conv(x)).mean(dim=(2, 3))
        return (h.sum() + self.head(self.embed(tokens)).sum()) * (1 + self.wide.sum().float()) + self.empty.sum()


def _mixed_batches(rank, n=6):
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(2, 3, 6, 6, generator=g).to(memory_format=torch.channels_last),
             torch.randint(0, 10, (4,), generator=g)) for _ in range(n)]


def _train_mixed(model, opt, batches, rounds=(), tensors=()):
    for step, (x, tokens) in enumerate(batches, start=1):
        opt.zero_grad()
        model(x, tokens).backward()
        opt.step()
        if step in rounds:
            average_one_by_one(tensors)


def _mixed_parity(flat_params):
    rank = dist.get_rank()
    batches = _mixed_batches(rank)
    torch.manual_seed(rank)
    ref = Mixed()
    _train_mixed(ref, torch.optim.SGD(ref.parameters(), lr=0.01), batches, {3, 6},
                 list(ref.parameters()) + [ref.bn.running_mean, ref.bn.running_var])
    torch.manual_seed(rank)
    model = Mixed()
    params = list(model.parameters())
    opt = LocalSGDOptimizer(torch.optim.SGD(params, lr=0.01), k=3, buffers=model, bucket_cap_mb=0.0005,
                            flat_params=flat_params, sync_on_init=False)
    bound = storage_ptrs(params)
    _train_mixed(model, opt, batches)
    got = params_of(model) + [model.bn.running_mean.clone(), model.bn.running_var.clone()]
    want = params_of(ref) + [ref.bn.running_mean.clone(), ref.bn.running_var.clone()]
    return (got, want, model.conv.weight.is_contiguous(memory_format=torch.channels_last),
            model.head.weight is model.embed.weight, storage_ptrs(params) == bound)


@pytest.mark.parametrize("flat_params", [True, False], ids=["flat", "copy-engine"])
def test_mixed_model_matches_reference(ranks, flat_params):
    for got, want, channels_last, tied, stayed in ranks(_mixed_parity, flat_params):
        assert channels_last and tied and stayed
        assert_same(got, want, exact=ranks.world_size == 2)  # 3 ranks: gloo's sum order differs


def _overlapping_parameters_are_staged():
    base = torch.randn(4, 4)
    a = nn.Parameter(base)  # a and b share memory: neither can be moved without breaking the other
    b = nn.Parameter(base[:2])
    c = nn.Parameter(torch.randn(3, 5).t())  # transposed: dense, moved with its strides
    d = nn.Parameter(torch.randn(6, 4)[:, :2])  # not dense: staged
    with torch.no_grad():
        for p in (a, c, d):
            p.add_(dist.get_rank())
    params = [a, b, c, d]
    ptrs = storage_ptrs(params)
    opt = LocalSGDOptimizer(torch.optim.SGD(params, lr=0.1), k=1, sync_on_init=False)
    expected = [p.detach().clone() for p in params]
    average_one_by_one(expected)  # (b is averaged with a's memory already averaged: do it the same way)
    expected[1] = expected[0][:2]
    opt.sync()
    staged = [p.data_ptr() == ptr for p, ptr in zip(params, ptrs)]
    return [p.detach().clone() for p in params], expected, staged, c.stride()


def test_overlapping_and_non_dense_parameters_are_staged(ranks2):
    for got, want, kept_storage, c_stride in ranks2(_overlapping_parameters_are_staged):
        assert kept_storage == [True, True, False, True]
        assert c_stride == (1, 5)  # moved with its strides
        assert_same(got, want, exact=True)  # b still aliases a's first rows, both averaged


# -- the user moves or casts the model after binding: re-flatten ----------------------------

def _cast_after_binding():
    model = make_model(seed=dist.get_rank())
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), k=2, bucket_cap_mb=0.01,
                            sync_on_init=False)
    opt.sync()
    model.double()  # Module._apply rebinds p.data to new float64 storage
    params = list(model.parameters())
    expected = params_of(model)
    average_one_by_one(expected)
    opt.sync()
    flat_again = len({p.untyped_storage().data_ptr() for p in params})
    return params_of(model), expected, flat_again, {str(p.dtype) for p in params}


def test_model_cast_after_binding_is_reflattened(ranks2):
    for got, want, storages, dtypes in ranks2(_cast_after_binding):
        assert dtypes == {"torch.float64"} and storages == 1
        assert_same(got, want, exact=True)


# -- what users do with the model: load_state_dict, state_dict, save and load ---------------

def _model_state_dict_roundtrip(tmp):
    model = make_model(seed=dist.get_rank())
    opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=2)
    ptrs = storage_ptrs(model.parameters())
    train_wrapped(model, opt, make_batches(3))
    path = f"{tmp}/model{dist.get_rank()}.pt"
    torch.save(model.state_dict(), path)
    saved = params_of(model)
    train_wrapped(model, opt, make_batches(3, rank=7))
    model.load_state_dict(torch.load(path, weights_only=True))  # copies in place
    loaded = params_of(model)
    same_storage = storage_ptrs(model.parameters()) == ptrs
    fresh = make_model(seed=99)
    fresh.load_state_dict(model.state_dict())  # views of flat storage load like any tensors
    return saved, loaded, params_of(fresh), same_storage


def test_model_state_dict_save_and_load(ranks2, tmp_path):
    for saved, loaded, fresh, same_storage in ranks2(_model_state_dict_roundtrip, str(tmp_path)):
        assert same_storage
        assert_same(loaded, saved, exact=True)
        assert_same(fresh, saved, exact=True)


# -- DDP built before the optimizer ----------------------------------------------------------

def _ddp_before_optimizer(bucket_view):
    from torch.nn.parallel import DistributedDataParallel as DDP

    rank = dist.get_rank()
    batches = make_batches(8)
    ref = make_model(seed=rank)  # the reference broadcasts rank 0's parameters, as DDP does
    reference_rounds(ref, torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9), batches, {4, 8})
    model = make_model(seed=rank)
    ddp = DDP(model, gradient_as_bucket_view=bucket_view, broadcast_buffers=False)  # broadcasts rank 0's
    opt = LocalSGDOptimizer(torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9), k=4, sync_on_init=False)
    counted = CountOps()
    for x, y in batches:
        opt.zero_grad()
        with opt.no_sync(ddp), counted:
            mse(ddp(x), y).backward()
        opt.step()
    return params_of(model), params_of(ref), counted.ops.get("allreduce_", 0)


@pytest.mark.parametrize("bucket_view", [False, True], ids=["grad-copy", "gradient_as_bucket_view"])
def test_ddp_built_before_the_optimizer(ranks2, bucket_view):
    for got, want, grad_allreduces in ranks2(_ddp_before_optimizer, bucket_view):
        assert grad_allreduces == 0  # no_sync: DDP's gradient all-reduce stayed off
        assert_same(got, want, exact=False)


# -- ranks must agree on memory order: their buckets line up element for element ------------

def _memory_format_differs():
    from localsgd_optim import LayoutMismatchError

    conv = nn.Conv2d(3, 4, 3)
    if dist.get_rank() == 1:
        conv = conv.to(memory_format=torch.channels_last)
    with pytest.raises(LayoutMismatchError) as info:
        LocalSGDOptimizer(torch.optim.SGD(conv.parameters(), lr=0.1), k=2)
    dist.barrier()  # nobody is stuck in a collective
    return str(info.value)


def test_ranks_with_different_memory_formats_are_refused(ranks2):
    for message in ranks2(_memory_format_differs):
        assert "float32[4, 3, 3, 3] on cpu with strides (27, 9, 3, 1) on rank 0" in message
        assert "with strides (27, 1, 9, 3) on rank 1" in message


# -- inner optimizers that step all parameters at once: foreach and fused AdamW ---------------

def _adamw_variant(variant):
    rank = dist.get_rank()
    batches = make_batches(8)
    kw = {variant: True}
    ref = make_model(seed=rank)
    reference_rounds(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2, **kw), batches, {4, 8})
    model = make_model(seed=rank)
    opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, **kw), k=4, bucket_cap_mb=0.01)
    train_wrapped(model, opt, batches)
    return params_of(model), params_of(ref)


@pytest.mark.parametrize("variant", ["foreach", "fused"])
def test_foreach_and_fused_adamw_step_the_flat_parameters(ranks, variant):
    for got, want in ranks(_adamw_variant, variant):
        assert_same(got, want, exact=ranks.world_size == 2)


# -- the storage check runs before anything uses the flat layout -----------------------------

def _rebind_between_launch_and_landing(rebind):
    from localsgd_optim import diloco

    model = make_model(seed=dist.get_rank())
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), k=2, outer_optimizer=diloco(),
                            overlap_steps=1, bucket_cap_mb=0.01)
    for step, (x, y) in enumerate(make_batches(6), start=1):
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()
        if rebind and step == 2:  # launched at step 2, lands at step 3: parameters now elsewhere
            for p in model.parameters():
                p.data = p.data.clone()
    return params_of(model)


def test_parameters_moved_before_an_overlapped_round_lands(ranks2):
    for moved, stayed in zip(ranks2(_rebind_between_launch_and_landing, True),
                             ranks2(_rebind_between_launch_and_landing, False)):
        assert_same(moved, stayed, exact=True)


class RebindsBuffer(nn.Module):
    """Reassigns its buffer in every forward (a new tensor object each time)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 4)
        self.register_buffer("ema", torch.zeros(4))

    def forward(self, x):
        out = self.lin(x)
        self.ema = 0.9 * self.ema + 0.1 * out.detach().mean(0)
        return out


def _buffer_rebound_every_forward():
    torch.manual_seed(dist.get_rank())
    model = RebindsBuffer()
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), k=2, buffers=model, sync_on_init=False)
    ptrs = storage_ptrs(model.parameters())
    emas = []
    for step, (x, y) in enumerate(make_batches(6), start=1):
        opt.zero_grad()
        mse(model(x), y).backward()
        before = model.ema.clone()
        opt.step()
        if step % 2 == 0:
            emas.append((before, model.ema.clone()))
    return storage_ptrs(model.parameters()) == ptrs, emas


def test_buffer_rebound_every_forward_is_averaged_without_moving_parameters(ranks2):
    results = ranks2(_buffer_rebound_every_forward)
    for stayed, _ in results:
        assert stayed  # only the staged buffer is re-read; the parameters are not re-flattened
    for (b0, a0), (b1, a1) in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a0, (b0 + b1) / 2, rtol=0, atol=0)
        torch.testing.assert_close(a1, a0, rtol=0, atol=0)


# -- compiled before the optimizer binds: the move happens under a compiled model -------------

def _compiled_then_bound():
    from torch._dynamo.utils import counters

    def train(compile_it):
        torch._dynamo.reset()
        counters.clear()
        model = make_model(seed=dist.get_rank())
        fwd = torch.compile(model, backend="aot_eager") if compile_it else model
        batches = make_batches(8)
        plain = torch.optim.SGD(model.parameters(), lr=0.05)
        for x, y in batches[:2]:  # compiled and run before LocalSGDOptimizer exists
            plain.zero_grad()
            mse(fwd(x), y).backward()
            plain.step()
        opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), k=2)  # moves the parameters
        for x, y in batches[2:]:
            opt.zero_grad()
            mse(fwd(x), y).backward()
            opt.step()
        recompiles = sum(counters["recompiles"].values()) if "recompiles" in counters else 0
        return params_of(model), recompiles

    (compiled, recompiles), (eager, _) = train(True), train(False)
    return compiled, eager, recompiles


def test_model_compiled_before_binding_keeps_training(ranks2):
    for compiled, eager, recompiles in ranks2(_compiled_then_bound):
        assert recompiles <= 1, recompiles  # at most one recompile for the parameters' new storage
        assert_same(compiled, eager, exact=False)


def _count_fragment_round_ops():
    torch.manual_seed(0)
    model = build_model(48, 128)
    params = list(model.parameters())
    opt = LocalSGDOptimizer(torch.optim.SGD(params, lr=0.0), k=4, fragments=2)
    counts = []
    for _ in range(8):  # fragment 0 at steps 2 and 6, fragment 1 at 4 and 8: count the second of each
        with CountOps() as counter:
            opt.step()
        counts.append(dict(counter.ops))
    return len(opt.engine.buckets), counts[5], counts[7]


def test_a_fragment_round_reduces_its_buckets_in_place(ranks2):
    # At cb26ab6 each fragment had a copy engine of its own: every round packed and unpacked
    # the fragment's parameters, which already sat contiguously in the flat storage.
    for buckets, first, second in ranks2(_count_fragment_round_ops):
        for ops in (first, second):
            assert not any("copy" in name for name in ops), ops
            assert 1 <= ops.get("allreduce_", 0) < buckets, ops  # a fragment's buckets only
            work = sum(n for name, n in ops.items() if not name.startswith("_record_function"))  # (step()'s profiler marks)
            assert work <= ops["allreduce_"] + 6, ops
        assert first["allreduce_"] + second["allreduce_"] == buckets  # the two fragments tile the plan
