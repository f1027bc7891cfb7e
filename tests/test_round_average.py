"""Plain-average rounds: post-local warmup, period schedules, buffer averaging, hierarchical (local) rounds.

Each option is checked against a reference that averages parameter by parameter at an
explicitly listed set of steps, and resumed mid-period from a checkpoint.
"""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
from torch import nn

from helpers import assert_same, make_batches, make_model, mse, params_of, resume_run, train_wrapped
from localsgd_optim import LocalSGDOptimizer, Schedule
from reference import average_one_by_one, broadcast_one_by_one, reference_rounds


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


# -- the schedule itself (no processes needed) -----------------------------------------------

def test_schedule_rounds():
    assert Schedule(4).rounds(13) == [4, 8, 12]
    assert Schedule(3, warmup_steps=5).rounds(14) == [1, 2, 3, 4, 5, 8, 11, 14]
    pairs = Schedule([(6, 2), (None, 4)])  # AdaComm-style: frequent, then infrequent ...
    assert pairs.rounds(20) == [2, 4, 6, 10, 14, 18]
    assert Schedule(lambda s: 2 if s <= 6 else 4).rounds(20) == pairs.rounds(20)
    assert Schedule([(8, 8), (None, 2)], warmup_steps=2).rounds(16) == [1, 2, 10, 12, 14, 16]  # ... or reverse


@pytest.mark.parametrize(
    "k, warmup, match",
    [
        ([(6, 2)], 0, r"last pair must be \(None, period\)"),
        ([(6, 0), (None, 2)], 0, r"k\[0\] must be an \(until_step, period\) pair with period an integer >= 1"),
        ([(6, 2), (4, 3), (None, 2)], 0, "until_step values must increase"),
        ([3], 0, r"k\[0\] must be an \(until_step, period\) pair"),
        (4, -1, "warmup_steps must be an integer >= 0, got -1"),
        (4, 2.0, "warmup_steps must be an integer >= 0, got 2.0"),
    ],
)
def test_schedule_rejects_bad_input(k, warmup, match):
    with pytest.raises(ValueError, match=match):
        Schedule(k, warmup_steps=warmup)


def test_callable_returning_bad_period_is_named():
    sched = Schedule(lambda s: 0)
    with pytest.raises(ValueError, match=r"k\(1\) must return an integer >= 1, got 0"):
        sched.rounds(5)


def test_buffers_argument_must_be_a_module():
    with pytest.raises(TypeError, match="buffers must be the nn.Module whose buffers to average"):
        LocalSGDOptimizer(sgd(make_model().parameters()), k=4, buffers=[torch.ones(2)])


# -- parity with the reference, on real ranks ----------------------------------------------

def _schedule_parity(k, warmup, steps):
    batches = make_batches(steps)
    rounds = set(Schedule(k, warmup).rounds(steps))
    ref = make_model(seed=dist.get_rank())
    reference_rounds(ref, sgd(ref.parameters()), batches, rounds)
    model = make_model(seed=dist.get_rank())
    opt = LocalSGDOptimizer(sgd(model.parameters()), k=k, warmup_steps=warmup, bucket_cap_mb=0.01)
    train_wrapped(model, opt, batches)
    return params_of(ref), params_of(model)


@pytest.mark.parametrize(
    "k, warmup",
    [(3, 5), ([(6, 2), (None, 4)], 0), ([(6, 2), (None, 4)], 3)],
    ids=["warmup5-k3", "pairs", "pairs-warmup3"],
)
def test_schedules_match_reference(ranks, k, warmup):
    for ref, got in ranks(_schedule_parity, k, warmup, 16):
        assert_same(got, ref, exact=ranks.world_size == 2)


def _callable_schedule():
    def period(step):  # infrequent, then frequent
        return 6 if step <= 6 else 2

    batches = make_batches(14)
    ref = make_model(seed=0)
    reference_rounds(ref, sgd(ref.parameters()), batches, {6, 8, 10, 12, 14})
    model = make_model(seed=0)
    opt = LocalSGDOptimizer(sgd(model.parameters()), k=period)
    train_wrapped(model, opt, batches)
    return params_of(ref), params_of(model)


def test_callable_period_matches_reference(ranks):
    for ref, got in ranks(_callable_schedule):
        assert_same(got, ref, exact=ranks.world_size == 2)


def _warmup_with_ddp():
    # Post-local SGD with DDP: gradient all-reduce for 5 steps, then local steps averaged every 3.
    # The reference switches by hand: DDP synced for the warmup, then DDP.no_sync + averaging.
    warmup, k, steps = 5, 3, 14
    batches = make_batches(steps)
    ref_net = make_model(seed=0)
    ref = nn.parallel.DistributedDataParallel(ref_net)
    ref_opt = sgd(ref.parameters())
    for step, (x, y) in enumerate(batches, start=1):
        ref_opt.zero_grad()
        if step <= warmup:
            mse(ref(x), y).backward()
        else:
            with ref.no_sync():
                mse(ref(x), y).backward()
        ref_opt.step()
        if step > warmup and (step - warmup) % k == 0:
            average_one_by_one(list(ref.parameters()))

    net = make_model(seed=0)
    model = nn.parallel.DistributedDataParallel(net)
    opt = LocalSGDOptimizer(sgd(model.parameters()), k=k, warmup_steps=warmup)
    flags = []
    with opt.no_sync(model):  # configured once: warmup_steps drives DDP's gradient sync
        for x, y in batches:
            flags.append(model.require_backward_grad_sync)
            opt.zero_grad()
            mse(model(x), y).backward()
            opt.step()
    restored = model.require_backward_grad_sync
    return params_of(ref_net), params_of(net), flags, restored


def test_warmup_with_ddp_matches_hand_switched_reference(ranks):
    for ref, got, flags, restored in ranks(_warmup_with_ddp):
        assert flags == [True] * 5 + [False] * 9
        assert restored is True
        assert_same(got, ref, exact=False)  # DDP averages gradients, bucketed: float rounding


# -- buffers --------------------------------------------------------------------------------

class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(16, 32)
        self.bn = nn.BatchNorm1d(32)
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        return self.out(torch.relu(self.bn(self.fc(x))))


def _buffers(average):
    batches = make_batches(9)
    ref = BNNet()
    ref_tensors = list(ref.parameters()) + [ref.bn.running_mean, ref.bn.running_var]
    reference_rounds(ref, sgd(ref.parameters()), batches, {4, 8},
                     tensors=ref_tensors if average else None)
    model = BNNet()
    opt = LocalSGDOptimizer(sgd(model.parameters()), k=4, buffers=model if average else None)
    train_wrapped(model, opt, batches[:8])
    after_round = [model.bn.running_mean.clone(), model.bn.running_var.clone()]
    train_wrapped(model, opt, batches[8:])
    return (params_of(ref) + [ref.bn.running_mean, ref.bn.running_var],
            params_of(model) + [model.bn.running_mean, model.bn.running_var],
            after_round, int(model.bn.num_batches_tracked))


@pytest.mark.parametrize("average", [True, False], ids=["buffers", "params-only"])
def test_batchnorm_buffers_averaged_with_parameters(ranks, average):
    results = ranks(_buffers, average)
    for ref, got, _, tracked in results:
        assert_same(got, ref, exact=ranks.world_size == 2)
        assert tracked == 9  # integer buffer: counted locally, identical on every rank
    same_stats = all(torch.equal(r[2][0], results[0][2][0]) for r in results[1:])
    assert same_stats == average  # replicas share running stats after a round only with buffers=


# -- resume mid-period, with every option on -------------------------------------------------

def _resume_with_options(with_buffers):
    k, warmup, stop, total = [(10, 2), (None, 4)], 3, 13, 20

    def build():
        model = BNNet()
        opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=k, warmup_steps=warmup,
                                buffers=model if with_buffers else None, bucket_cap_mb=0.001)
        return model, opt

    uninterrupted, resumed, ckpt = resume_run(build, make_batches(total), stop,
                                              snapshot=lambda m: params_of(m) + [m.bn.running_mean.clone()])
    return uninterrupted, resumed, ckpt["opt"]["local_sgd"]

@pytest.mark.parametrize("with_buffers", [True, False], ids=["buffers", "no-buffers"])
def test_resume_mid_period_with_warmup_pairs_and_buffers(ranks, with_buffers):
    for uninterrupted, resumed, entry in ranks(_resume_with_options, with_buffers):
        assert_same(resumed, uninterrupted, exact=True)
        assert entry == {"version": 1, "num_steps": 13, "k": [[10, 2], [None, 4]], "warmup_steps": 3}


# -- hierarchical averaging: 4 ranks in 2 groups ---------------------------------------------

def _hierarchical():
    rank = dist.get_rank()
    local, _ = dist.new_subgroups(2)  # ranks {0, 1} and {2, 3}, e.g. two hosts of two GPUs
    k, local_k, steps = 6, 2, 10  # local rounds at 2, 4, 8, 10; global at 6 (takes precedence)
    batches = make_batches(steps)

    ref = make_model(seed=rank)
    ref_opt = sgd(ref.parameters())
    ref_params = list(ref.parameters())
    broadcast_one_by_one(ref_params)
    kinds = []
    for step, (x, y) in enumerate(batches, start=1):
        ref_opt.zero_grad()
        mse(ref(x), y).backward()
        ref_opt.step()
        if step % k == 0:
            average_one_by_one(ref_params)
            kinds.append("global")
        elif step % local_k == 0:
            average_one_by_one(ref_params, group=local)
            kinds.append("local")

    model = make_model(seed=rank)
    opt = LocalSGDOptimizer(sgd(model.parameters()), k=k, local_k=local_k, local_group=local)
    train_wrapped(model, opt, batches)
    return params_of(ref), params_of(model), kinds


def test_hierarchical_averaging_on_two_groups_of_two(ranks4):
    results = ranks4(_hierarchical)
    assert results[0][2] == ["local", "local", "global", "local", "local"]
    for ref, got, _ in results:
        assert_same(got, ref, exact=False)  # 4-rank ring sums: order-dependent rounding
    # step 10 was a local round: equal within each group (bit for bit), different across groups
    assert_same(results[1][1], results[0][1], exact=True)
    assert_same(results[3][1], results[2][1], exact=True)
    assert not torch.equal(results[0][1][0], results[2][1][0])


def test_local_k_needs_local_group():
    with pytest.raises(ValueError, match="local_k and local_group go together"):
        LocalSGDOptimizer(sgd(make_model().parameters()), k=4, local_k=2)


def _hierarchical_resume():
    rank = dist.get_rank()
    local, _ = dist.new_subgroups(2)

    def build():
        model = make_model(seed=rank)
        return model, LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=6, local_k=2,
                                        local_group=local, warmup_steps=1)

    # stopped at 7: after the global round at 6, before the local one at 9
    uninterrupted, resumed, _ = resume_run(build, make_batches(10), 7)
    return uninterrupted, resumed

def test_hierarchical_resume_mid_period(ranks4):
    for uninterrupted, resumed in ranks4(_hierarchical_resume):
        assert_same(resumed, uninterrupted, exact=True)
