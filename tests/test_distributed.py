"""Multi-rank tests: real processes, real gloo, 2 and 3 ranks, asserted against the reference."""

from __future__ import annotations

import contextlib
import io
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

from helpers import INNER, assert_same, make_batches, make_model, mse, params_of, train_wrapped
from localsgd_optim import LayoutMismatchError, LocalSGDOptimizer, no_sync
from reference import average_one_by_one, reference_join, train_local_sgd_reference

SMALL_CAP_MB = 0.01  # ~2.6k fp32 elements: several buckets plus an in-place one


# -- parity with the reference --------------------------------------------------------------

def _parity(inner_name, k, cap_mb, steps):
    batches = make_batches(steps)
    ref_model = make_model(seed=dist.get_rank())  # different init per rank: sync_on_init must fix it
    train_local_sgd_reference(ref_model, INNER[inner_name](ref_model.parameters()), k, batches, mse)

    model = make_model(seed=dist.get_rank())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # k=1 warns by design
        opt = LocalSGDOptimizer(INNER[inner_name](model.parameters()), k=k, bucket_cap_mb=cap_mb)
    ptrs = [p.data_ptr() for p in model.parameters()]
    train_wrapped(model, opt, batches)
    assert [p.data_ptr() for p in model.parameters()] == ptrs, "storage changed"
    assert opt.num_steps == steps
    return params_of(ref_model), params_of(model)


@pytest.mark.parametrize("inner_name", ["sgd_momentum", "adamw"])
@pytest.mark.parametrize("k", [1, 3, 4])
def test_parity_with_reference(ranks, inner_name, k):
    cap = SMALL_CAP_MB if k != 3 else 25.0
    for ref, got in ranks(_parity, inner_name, k, cap, 10):
        # 2 ranks: a+b is order-free, so bucketed == per-parameter bit for bit. 3 ranks: gloo's
        # ring sums each element in an order set by its chunk, so flat and per-tensor differ by ~1 ulp.
        assert_same(got, ref, exact=ranks.world_size == 2)


def _one_round_dyadic(cap_mb):
    # Values are multiples of 1/8 below 2^10: every sum over ranks is exact in any order, so
    # the engine must match the reference bit for bit on any world size.
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(rank)
    shapes = [(3,), (64, 64), (5, 7), (1,), (1000,), (2, 3, 4)]
    a = [torch.randint(-8000, 8000, s, generator=g).float() / 8 for s in shapes]
    b = [t.clone() for t in a]
    mixed = [torch.randint(-8, 8, (9,), generator=g).to(torch.bfloat16)]
    model = nn.Module()
    for i, t in enumerate(a + mixed):
        model.register_parameter(f"p{i}", nn.Parameter(t))
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), k=2,
                            bucket_cap_mb=cap_mb, sync_on_init=False)
    opt.sync()
    ref = b + [mixed[0].detach().clone()]
    average_one_by_one(ref)
    return params_of(model), ref, [p.dtype for p in model.parameters()]


@pytest.mark.parametrize("cap_mb", [SMALL_CAP_MB, 25.0])
def test_one_round_exact_on_any_world_size(ranks, cap_mb):
    results = ranks(_one_round_dyadic, cap_mb)
    for got, ref, dtypes in results:
        assert_same(got, ref, exact=True)
        assert dtypes[-1] == torch.bfloat16
    for got, _, _ in results[1:]:
        assert_same(got, results[0][0], exact=True)  # every replica identical


# -- k=1 is DDP ----------------------------------------------------------------------------

def _k1_vs_ddp():
    batches = make_batches(6)
    base = make_model(seed=0)
    ddp = nn.parallel.DistributedDataParallel(base)
    ddp_opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    train_wrapped(ddp, ddp_opt, batches)

    model = make_model(seed=0)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), k=1)
    assert any("k=1" in str(x.message) for x in w)
    train_wrapped(model, opt, batches)
    return params_of(base), params_of(model)


def test_k1_equals_ddp(ranks):
    for ddp_params, ours in ranks(_k1_vs_ddp):
        # DDP averages gradients, we average parameters: equal up to float rounding.
        assert_same(ours, ddp_params, exact=False)


# -- checkpoints ----------------------------------------------------------------------------

def _resume_mid_period(inner_name):
    k, stop, total = 4, 13, 20
    batches = make_batches(total)
    model = make_model(seed=1)
    opt = LocalSGDOptimizer(INNER[inner_name](model.parameters()), k=k, bucket_cap_mb=SMALL_CAP_MB)
    train_wrapped(model, opt, batches)
    uninterrupted = params_of(model)

    model = make_model(seed=1)
    opt = LocalSGDOptimizer(INNER[inner_name](model.parameters()), k=k, bucket_cap_mb=SMALL_CAP_MB)
    train_wrapped(model, opt, batches[:stop])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    # rank-specific state at step 13 (not an averaging step): replicas differ here
    mid = params_of(model)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model = make_model(seed=99)
    opt = LocalSGDOptimizer(INNER[inner_name](model.parameters()), k=k, bucket_cap_mb=SMALL_CAP_MB)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    assert opt.num_steps == stop
    assert opt.param_groups is opt.optimizer.param_groups and opt.state is opt.optimizer.state
    train_wrapped(model, opt, batches[stop:])
    return uninterrupted, params_of(model), mid, ckpt["opt"]["local_sgd"]


@pytest.mark.parametrize("inner_name", ["sgd_momentum", "adamw"])
def test_resume_mid_period_is_bit_exact(ranks, inner_name):
    results = ranks(_resume_mid_period, inner_name)
    for uninterrupted, resumed, _, entry in results:
        assert_same(resumed, uninterrupted, exact=True)
        assert entry == {"version": 1, "num_steps": 13, "k": 4, "warmup_steps": 0}
    assert not torch.equal(results[0][2][0], results[1][2][0]), "step 13 should be mid-period"


# -- parameters unused on one rank, mixed dtypes, storage -----------------------------------

class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(8, 8)
        self.head_a = nn.Linear(8, 2)
        self.head_b = nn.Linear(8, 2).to(torch.bfloat16)

    def forward(self, x, use_b):
        h = self.trunk(x)
        out = self.head_a(h)
        if use_b:
            out = out + self.head_b(h.bfloat16()).float()
        return out


def _unused_on_one_rank():
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(rank)
    data = [(torch.randn(4, 8, generator=g), torch.randn(4, 2, generator=g)) for _ in range(6)]
    use_b = rank != 1  # rank 1 never touches head_b: its grads stay None there

    def run(model, step_fn):
        for x, y in data:
            model.zero_grad()
            mse(model(x, use_b), y).backward()
            step_fn()

    ref = TwoHeads()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.125, momentum=0.5)
    count = [0]

    def ref_step():
        ref_opt.step()
        count[0] += 1
        if count[0] % 3 == 0:
            average_one_by_one(list(ref.parameters()))

    run(ref, ref_step)
    model = TwoHeads()
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.125, momentum=0.5), k=3)
    ptrs = [p.data_ptr() for p in model.parameters()]  # moved into flat storage once, at binding
    run(model, opt.step)
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert model.head_b.weight.dtype == torch.bfloat16
    return params_of(ref), params_of(model)


def test_parameter_unused_on_one_rank_and_mixed_dtypes(ranks):
    results = ranks(_unused_on_one_rank)
    for ref, got in results:
        # 3 ranks: one bf16 ulp (0.4%) of sum-order noise, fed back into the fp32 trunk
        assert_same(got, ref, exact=ranks.world_size == 2, rtol=2e-2, atol=2e-3)
    for _, got in results[1:]:
        assert_same(got, results[0][1], exact=True)


# -- ranks that disagree --------------------------------------------------------------------

def _mismatch(kind):
    rank = dist.get_rank()
    if kind == "shape":
        model = nn.Linear(4, 3 if rank == 1 else 2)
        opt_kwargs = {}
    elif kind == "count":
        model = nn.Linear(4, 2, bias=rank != 1)
        opt_kwargs = {}
    elif kind == "k":
        model = nn.Linear(4, 2)
        opt_kwargs = {"k": 4 if rank == 1 else 8}
    else:
        model = nn.Linear(4, 2)
        opt_kwargs = {"bucket_cap_mb": 1.0 if rank == 1 else 25.0}
    with pytest.raises(LayoutMismatchError) as info:
        LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), **opt_kwargs)
    dist.barrier()  # the group is still usable: nobody is stuck in a collective
    return str(info.value)


@pytest.mark.parametrize("kind", ["shape", "count", "k", "bucket_cap_mb"])
def test_mismatch_raises_on_every_rank(ranks, kind):
    messages = ranks(_mismatch, kind)
    assert len(set(messages)) == 1, messages  # the same verdict everywhere
    msg = messages[0]
    expected = {
        "shape": "param group 0, index 0): float32[2, 4] on cpu on rank 0, float32[3, 4] on cpu on rank 1",
        "count": "rank 0 has 2, rank 1 has 1",
        "k": "ranks disagree on k: rank 0 has 8, rank 1 has 4",
        "bucket_cap_mb": "ranks disagree on bucket_cap_mb: rank 0 has 25.0, rank 1 has 1.0",
    }[kind]
    assert expected in msg, msg


# -- DDP and no_sync ------------------------------------------------------------------------

def _no_sync_ddp():
    rank = dist.get_rank()
    model = nn.parallel.DistributedDataParallel(make_model(seed=0))
    x, y = make_batches(1)[0]
    with no_sync(model):
        mse(model(x), y).backward()
    local = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    mse(model(x), y).backward()
    synced = [p.grad.clone() for p in model.parameters()]
    return rank, local, synced


def test_no_sync_turns_off_ddp_allreduce(ranks):
    results = ranks(_no_sync_ddp)
    # inside no_sync each rank keeps its own gradient; outside, DDP averages them
    assert not torch.equal(results[0][1][0], results[1][1][0])
    mean = [torch.stack([r[1][i] for r in results]).mean(0) for i in range(len(results[0][1]))]
    for _, _, synced in results:
        assert_same(synced, mean, exact=False)


def _no_sync_bn_warns():
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    with pytest.warns(UserWarning, match="forward_sync_buffers=False"):
        with no_sync(model):
            pass
    quiet = nn.parallel.DistributedDataParallel(nn.Linear(4, 4))  # no buffers: nothing to broadcast
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with no_sync(quiet):
            pass
    return True


def test_no_sync_warns_on_broadcast_buffers(ranks2):
    assert ranks2(_no_sync_bn_warns) == [True, True]


def _ddp_local_sgd_training():
    # The README pattern: DDP module + no_sync + LocalSGDOptimizer == reference Local SGD.
    batches = make_batches(8)
    ref = make_model(seed=0)
    train_local_sgd_reference(ref, torch.optim.SGD(ref.parameters(), lr=0.05), 4, batches, mse)
    model = nn.parallel.DistributedDataParallel(make_model(seed=0))
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), k=4)
    with no_sync(model):
        train_wrapped(model, opt, batches)
    return params_of(ref), params_of(model.module)


def test_ddp_no_sync_training_matches_reference(ranks):
    for ref, got in ranks(_ddp_local_sgd_training):
        assert_same(got, ref, exact=ranks.world_size == 2)


# -- schedule, sync(), hooks, add_param_group ------------------------------------------------

def _schedule_and_hooks():
    rank = dist.get_rank()
    model = make_model(seed=rank)
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), k=3, sync_on_init=False)
    spread = []  # after each step: are the replicas identical?
    calls = []

    def post(o, args, kwargs):
        p = next(model.parameters()).detach().clone()
        gathered = [torch.empty_like(p) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, p)
        spread.append(all(torch.equal(g, gathered[0]) for g in gathered))
        calls.append(o.num_steps)

    opt.register_step_post_hook(post)
    opt.register_step_pre_hook(lambda o, a, kw: calls.append("pre"))
    for x, y in make_batches(7):
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()
    opt.sync()  # explicit sync: averages now, does not shift the schedule
    p = next(model.parameters()).detach().clone()
    gathered = [torch.empty_like(p) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, p)
    return spread, calls, opt.num_steps, all(torch.equal(g, gathered[0]) for g in gathered)


def test_schedule_sync_and_hooks(ranks):
    for spread, calls, num_steps, synced in ranks(_schedule_and_hooks):
        assert spread == [False, False, True, False, False, True, False]
        assert calls == [x for n in range(1, 8) for x in ("pre", n)]
        assert num_steps == 7 and synced


def _add_param_group():
    batches = make_batches(8)
    torch.manual_seed(dist.get_rank())
    extra_ref = nn.Parameter(torch.randn(5))
    extra = nn.Parameter(extra_ref.detach().clone())

    def loss_with(model, p, x, y):
        return mse(model(x), y) + (p * x[:, :5]).pow(2).mean()

    ref = make_model(seed=0)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    for step, (x, y) in enumerate(batches, 1):
        ref_opt.zero_grad()
        loss_with(ref, extra_ref, x, y).backward()
        ref_opt.step()
        if step == 2:
            ref_opt.add_param_group({"params": [extra_ref], "lr": 0.1})
        if step % 4 == 0:
            average_one_by_one([p for g in ref_opt.param_groups for p in g["params"]])

    model = make_model(seed=0)
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), k=4)
    for step, (x, y) in enumerate(batches, 1):
        opt.zero_grad()
        loss_with(model, extra, x, y).backward()
        opt.step()
        if step == 2:
            opt.add_param_group({"params": [extra], "lr": 0.1})
    assert len(opt.optimizer.param_groups) == 2
    return params_of(ref) + [extra_ref.detach().clone()], params_of(model) + [extra.detach().clone()]


def test_add_param_group_is_averaged(ranks):
    for ref, got in ranks(_add_param_group):
        assert_same(got, ref, exact=ranks.world_size == 2)


# -- found in review: things that used to go silently wrong ---------------------------------

def _storage_moved():
    # model.double() after construction swaps every parameter's storage (and dtype)
    rank = dist.get_rank()
    model = make_model(seed=0)
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), k=2, bucket_cap_mb=SMALL_CAP_MB)
    model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(rank))
    opt.sync()
    return [p.detach().clone() for p in model.parameters()]


def test_parameters_moved_after_construction_are_still_averaged(ranks):
    mean = sum(range(ranks.world_size)) / ranks.world_size
    for params in ranks(_storage_moved):
        for p in params:
            assert p.dtype == torch.float64 and torch.all(p == mean)


def _add_group_on_one_rank():
    model = make_model(seed=0)
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), k=2)
    if dist.get_rank() == 1:
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})
    with pytest.raises(LayoutMismatchError) as info:
        opt.sync()
    dist.barrier()
    return str(info.value)


def test_add_param_group_on_one_rank_raises_everywhere(ranks):
    messages = ranks(_add_group_on_one_rank)
    assert len(set(messages)) == 1
    assert "rank 0 has 6, rank 1 has 7" in messages[0] and "missing on rank 0" in messages[0]


def _resumed_out_of_phase():
    from localsgd_optim import ScheduleMismatchError

    model = make_model(seed=0)
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), k=4)
    sd = opt.state_dict()
    sd["local_sgd"]["num_steps"] = 2 if dist.get_rank() == 1 else 0
    opt.load_state_dict(sd)
    batches = make_batches(8)
    with pytest.raises(ScheduleMismatchError) as info:
        train_wrapped(model, opt, batches)
    dist.barrier()
    return str(info.value), opt.num_steps


def test_ranks_resumed_at_different_steps_raise_everywhere(ranks):
    results = ranks(_resumed_out_of_phase)
    assert len({m for m, _ in results}) == 1
    msg = results[0][0]
    assert "resumed from different step counts ([0, 2" in msg
    assert [n for _, n in results] == [4, 4] + [4] * (ranks.world_size - 2)  # caught at the first round


def _uneven_then_sync():
    from localsgd_optim import ScheduleMismatchError

    rank = dist.get_rank()
    model = make_model(seed=0)
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), k=4)
    batches = make_batches(10 if rank == 0 else 12)  # uneven loaders
    with pytest.raises(ScheduleMismatchError) as info:
        train_wrapped(model, opt, batches)  # rank 0 stops at 10, the others average at 12 ...
        opt.sync()  # ... while rank 0 syncs at 10
    dist.barrier()
    return str(info.value)


def test_uneven_step_counts_raise_everywhere_with_both_counts(ranks):
    messages = ranks(_uneven_then_sync)
    assert len(set(messages)) == 1
    assert "rank 0: an explicit sync() at step 10; rank 1: a scheduled averaging round at step 12" in messages[0]


def _late_process_group():
    # Built as if torch.distributed were not up yet: no broadcast, no collective at construction.
    from unittest import mock

    import localsgd_optim._dist as ldist

    model = make_model(seed=dist.get_rank())  # different init per rank
    with mock.patch.object(ldist.dist, "is_initialized", return_value=False):
        opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), k=100)
    before = params_of(model)
    train_wrapped(model, opt, make_batches(1))  # binds and broadcasts before the first step
    return before, params_of(model)


def test_process_group_created_after_construction_binds_and_broadcasts(ranks):
    results = ranks(_late_process_group)
    rank0_init = results[0][0]
    assert not torch.equal(results[1][0][0], rank0_init[0])
    for _, after in results:
        assert_same(after, rank0_init, exact=True)


def _subgroup():
    rank = dist.get_rank()
    group = dist.new_group([0, 2])
    model = nn.Linear(2, 2)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(rank))
    if rank == 1:
        with pytest.raises(ValueError, match=r"process_group does not contain this rank \(global rank 1\)"):
            LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), k=2, process_group=group)
        return params_of(model)
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), k=2, process_group=group,
                            sync_on_init=False)
    opt.sync()
    import copy

    with pytest.raises(TypeError, match="explicit process_group"):
        copy.deepcopy(opt)
    return params_of(model)


def test_process_group_subset(ranks):
    if ranks.world_size != 3:
        pytest.skip("needs 3 ranks")
    results = ranks(_subgroup)
    assert all(torch.all(p == 1.0) for p in results[0] + results[2])  # mean of ranks 0 and 2
    assert all(torch.all(p == 1.0) for p in results[1])  # rank 1 untouched (its own value)


def _integer_parameter():
    # torch's own post-local SGD parity model has an int64 nn.Parameter(requires_grad=False):
    # optimizers and DDP accept it, and so do we. It is left alone, and averaging goes on around it.
    rank = dist.get_rank()
    torch.manual_seed(rank)
    model = nn.Linear(2, 2)
    model.register_parameter("count", nn.Parameter(torch.full((3,), 10 + rank, dtype=torch.long), requires_grad=False))
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), k=2, sync_on_init=False)
    expected = [model.weight.detach().clone(), model.bias.detach().clone()]
    average_one_by_one(expected)
    opt.sync()
    return [model.weight.detach(), model.bias.detach()], expected, model.count.tolist(), opt.engine.numel


def test_integer_parameter_is_left_alone_and_the_rest_averaged(ranks2):
    for rank, (got, want, count, averaged) in enumerate(ranks2(_integer_parameter)):
        assert_same(got, want, exact=True)
        assert count == [10 + rank] * 3 and averaged == 6  # the weight and bias only


def _integer_parameter_on_one_rank_only():
    model = nn.Linear(2, 2)
    if dist.get_rank() == 1:
        model.register_parameter("count", nn.Parameter(torch.zeros(3, dtype=torch.long), requires_grad=False))
    with pytest.raises(LayoutMismatchError) as info:
        LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), k=2)
    dist.barrier()
    return str(info.value)


def test_integer_parameters_still_count_in_the_layout_check(ranks2):
    for message in ranks2(_integer_parameter_on_one_rank_only):
        assert "parameter (param group 0, index 2): missing on rank 0, int64[3] on cpu on rank 1" in message


# -- reliability: NaN guard, GradScaler, errors on the way out, checkpoints across world sizes

def _nan_on_one_rank(check_finite):
    from localsgd_optim import NonFiniteParameterError

    rank = dist.get_rank()
    model = make_model(seed=0)
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), k=4, check_finite=check_finite)
    batches = make_batches(4)
    train_wrapped(model, opt, batches[:3])
    if rank == 1:
        with torch.no_grad():
            model[2].weight[0, 0] = float("nan")  # e.g. a blown-up update
    before = params_of(model)
    if not check_finite:
        opt.sync()
        return None, before, params_of(model)
    with pytest.raises(NonFiniteParameterError) as info:
        opt.sync()
    after = params_of(model)
    dist.barrier()
    return str(info.value), before, after


def test_nan_on_one_rank_is_not_averaged_into_the_others(ranks):
    results = ranks(_nan_on_one_rank, True)
    messages = {m for m, _, _ in results}
    assert len(messages) == 1
    msg = messages.pop()
    assert "not averaging at step 3" in msg and "(rank 1: parameter (param group 0, index 2))" in msg
    for _, before, after in results:
        assert_same(after, before, exact=True)  # nothing was averaged: every replica untouched


def test_without_the_guard_nan_spreads_to_every_replica(ranks2):
    # the failure the guard prevents: one rank's NaN poisons all replicas
    for _, _, after in ranks2(_nan_on_one_rank, False):
        assert not torch.isfinite(after[2]).all()


def _grad_scaler_inf_on_one_rank():
    rank = dist.get_rank()
    batches = make_batches(8)
    poison = 2 if rank == 1 else -1

    def loss_at(model, i, x, y):
        loss = mse(model(x), y)
        return loss * float("inf") if i == poison else loss

    # reference: plain SGD, the inf step skipped by hand on that rank, averaged every 4 steps
    ref = make_model(seed=0)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    for i, (x, y) in enumerate(batches):
        ref_opt.zero_grad()
        loss_at(ref, i, x, y).backward()
        if i != poison:
            ref_opt.step()
        if (i + 1) % 4 == 0:
            average_one_by_one(list(ref.parameters()))

    model = make_model(seed=0)
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), k=4)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)  # scale 1: the unscaled grads match the reference's
    for i, (x, y) in enumerate(batches):
        opt.zero_grad()
        scaler.scale(loss_at(model, i, x, y)).backward()
        scaler.step(opt)
        scaler.update()
    return params_of(ref), params_of(model), opt.num_steps, scaler.get_scale()


def test_grad_scaler_skipped_step_on_one_rank_keeps_ranks_in_step(ranks):
    results = ranks(_grad_scaler_inf_on_one_rank)
    for rank, (ref, got, num_steps, scale) in enumerate(results):
        assert num_steps == 8  # the skipped step counted on rank 1 too
        assert_same(got, ref, exact=ranks.world_size == 2)
        assert scale == (0.5 if rank == 1 else 1.0)  # rank 1 backed off once
    for _, got, _, _ in results[1:]:
        assert_same(got, results[0][1], exact=True)  # replicas equal after the last round


def _error_inside_no_sync():
    # Rank 1's loop raises inside no_sync between averaging rounds; nothing of ours may run a
    # collective on that error path, or it would pair with rank 0's next collective below.
    rank = dist.get_rank()
    model = nn.parallel.DistributedDataParallel(make_model(seed=0))
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), k=4)
    try:
        with no_sync(model):
            for i, (x, y) in enumerate(make_batches(6)):
                mse(model(x), y).backward()
                opt.step()
                opt.zero_grad()
                if rank == 1 and i == 4:
                    raise KeyError("data loader broke")
    except KeyError:
        pass
    marker = torch.tensor([float(rank + 1)])
    dist.all_reduce(marker)  # the first collective after the error: must pair with every rank's
    return marker.item(), model.require_backward_grad_sync


def test_error_inside_no_sync_runs_no_collective(ranks):
    w = ranks.world_size
    for total, sync_restored in ranks(_error_inside_no_sync):
        assert total == w * (w + 1) / 2  # paired with the marker, not with a stray collective
        assert sync_restored  # DDP's gradient sync is back on after the block


def _save_at_world_size():
    model = make_model(seed=0)
    opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=4)
    train_wrapped(model, opt, make_batches(8))
    opt.sync()  # the documented pattern: sync, then rank 0 saves model + optimizer
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    return buf.getvalue() if dist.get_rank() == 0 else None


def _load_at_world_size(blob):
    ckpt = torch.load(io.BytesIO(blob), weights_only=True)
    model = make_model(seed=5)
    opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=4)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    train_wrapped(model, opt, make_batches(4))  # steps 9..12: one round at step 12
    return opt.num_steps, params_of(model)


def test_checkpoint_saved_at_one_world_size_loads_at_another(ranks):
    from conftest import _pool

    saved_by = 3 if ranks.world_size == 2 else 2
    blob = _pool(saved_by).run(_save_at_world_size)[0]
    results = ranks(_load_at_world_size, blob)
    for num_steps, params in results:
        assert num_steps == 12
        assert_same(params, results[0][1], exact=True)  # the round at step 12 ran on all ranks


# -- uneven inputs: torch.distributed.algorithms.Join ---------------------------------------

BATCHES_PER_RANK = {2: [10, 13], 3: [10, 13, 12]}


def _join_run(with_ddp):
    from torch.distributed.algorithms import Join

    world, rank, k = dist.get_world_size(), dist.get_rank(), 4
    counts = BATCHES_PER_RANK[world]
    ref = reference_join(counts, k, rank)
    net = make_model(seed=0)
    model = nn.parallel.DistributedDataParallel(net) if with_ddp else net
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), k=k)
    with no_sync(model), Join([opt]):  # DDP under no_sync issues no collectives: no Join of its own
        train_wrapped(model, opt, make_batches(counts[rank]))
    before_sync, num_steps = params_of(net), opt.num_steps
    opt.sync()  # every rank counted every step, so a final sync agrees
    return ref, before_sync, params_of(net), num_steps


@pytest.mark.parametrize("with_ddp", [False, True], ids=["plain", "ddp"])
def test_join_uneven_inputs_match_reference(ranks, with_ddp):
    results = ranks(_join_run, with_ddp)
    for ref, before_sync, _, num_steps in results:
        assert num_steps == 13  # joined ranks kept counting the others' steps
        assert_same(before_sync, ref, exact=ranks.world_size == 2)
    for _, _, after_sync, _ in results[1:]:
        assert_same(after_sync, results[0][2], exact=True)


def _join_misuse(case):
    from torch.distributed.algorithms import Join

    from localsgd_optim import LocalSGDError

    model = nn.parallel.DistributedDataParallel(make_model(seed=0))
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), k=4)
    batches = make_batches(3 + dist.get_rank())  # uneven
    if case == "ddp-first":
        with pytest.raises(LocalSGDError, match=r"must be the first \(or only\) joinable: use Join\(\[opt\]\)"):
            with no_sync(model), Join([model, opt]):
                train_wrapped(model, opt, batches)
    else:
        with pytest.raises(LocalSGDError, match="sync\\(\\) inside an active Join block would hang"):
            with no_sync(model), Join([opt]):
                train_wrapped(model, opt, batches[:1])
                opt.sync()
    dist.barrier()  # nobody is stuck in a collective
    return True


@pytest.mark.parametrize("case", ["ddp-first", "sync-inside"])
def test_join_misuse_raises_everywhere_without_hanging(ranks, case):
    assert all(ranks(_join_misuse, case))


def _local_failure_on_one_rank():
    from unittest import mock

    from localsgd_optim import LocalSGDError

    model = make_model(seed=0)
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), k=2, bucket_cap_mb=0.001)
    train_wrapped(model, opt, make_batches(1))
    before = params_of(model)
    boom = torch.OutOfMemoryError("out of memory allocating the bucket buffers")
    patch = mock.patch.object(opt.engine, "prepare", side_effect=boom) if dist.get_rank() == 0 \
        else contextlib.nullcontext()
    with patch, pytest.raises((torch.OutOfMemoryError, LocalSGDError)) as info:
        train_wrapped(model, opt, make_batches(1))  # step 2: the round
    after_inner = params_of(model)
    dist.barrier()
    return type(info.value).__name__, str(info.value), before, after_inner


def test_local_failure_on_one_rank_raises_everywhere_before_any_data_moves(ranks):
    results = ranks(_local_failure_on_one_rank)
    assert results[0][0] == "OutOfMemoryError"  # the failing rank sees its own error, unwrapped
    for name, msg, _, _ in results[1:]:
        assert name == "LocalSGDError" and "rank(s) [0] failed while preparing" in msg
