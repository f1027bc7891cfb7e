"""average_optimizer_state: the inner optimizer's state averaged with the parameters at each round.

The oracle averages every parameter, then every state tensor (in parameter, then key order,
``step`` excluded), one collective at a time, after the same steps.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import assert_same, make_batches, make_model, mse, params_of, resume_run
from localsgd_optim import LayoutMismatchError, LocalSGDOptimizer, diloco
from reference import average_one_by_one, broadcast_one_by_one

INNER = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
}


def state_tensors(opt, params):
    return [v for p in params for key, v in sorted(opt.state[p].items())
            if key != "step" and torch.is_tensor(v) and v.shape == p.shape]


def snapshot(model, opt):
    params = list(model.parameters())
    return params_of(model) + [t.clone() for t in state_tensors(opt, params)]


def _parity(inner_name):
    batches = make_batches(8)
    ref = make_model(seed=dist.get_rank())
    params = list(ref.parameters())
    ref_opt = INNER[inner_name](params)
    broadcast_one_by_one(params)
    for step, (x, y) in enumerate(batches, start=1):
        ref_opt.zero_grad()
        mse(ref(x), y).backward()
        ref_opt.step()
        if step % 4 == 0:
            average_one_by_one(params)
            average_one_by_one(state_tensors(ref_opt, params))
    model = make_model(seed=dist.get_rank())
    opt = LocalSGDOptimizer(INNER[inner_name](model.parameters()), k=4, bucket_cap_mb=0.01,
                            average_optimizer_state=True)
    for x, y in batches:
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()
    return snapshot(ref, ref_opt), snapshot(model, opt)


@pytest.mark.parametrize("inner_name", ["adamw", "sgd_momentum"])
def test_state_is_averaged_like_the_reference(ranks, inner_name):
    results = ranks(_parity, inner_name)
    for want, got in results:
        assert len(got) == len(want) > len(list(make_model().parameters()))  # the state is in there
        assert_same(got, want, exact=ranks.world_size == 2)
    for _, got in results[1:]:
        assert_same(got, results[0][1], exact=True)  # parameters and state equal on every rank


def _without_option_state_differs():
    model = make_model(seed=dist.get_rank())
    opt = LocalSGDOptimizer(INNER["adamw"](model.parameters()), k=4)
    for x, y in make_batches(4):
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()
    return state_tensors(opt, list(model.parameters()))


def test_without_the_option_each_rank_keeps_its_own_state(ranks2):
    a, b = ranks2(_without_option_state_differs)
    assert not torch.equal(a[0], b[0])  # the test above would fail without averaging


def _resume(inner_name):
    def build():
        model = make_model(seed=dist.get_rank())
        return model, LocalSGDOptimizer(INNER[inner_name](model.parameters()), k=4, average_optimizer_state=True)

    uninterrupted, resumed, _ = resume_run(build, make_batches(10), stop=6)
    return uninterrupted, resumed


def test_mid_period_resume_is_exact(ranks2):
    for uninterrupted, resumed in ranks2(_resume, "adamw"):
        assert_same(resumed, uninterrupted, exact=True)


def _with_diloco():
    model = make_model(seed=dist.get_rank())
    opt = LocalSGDOptimizer(INNER["adamw"](model.parameters()), k=3, outer_optimizer=diloco(),
                            average_optimizer_state=True)
    for x, y in make_batches(6):
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()
    return snapshot(model, opt)


def test_with_an_outer_optimizer_the_state_is_averaged_as_values(ranks2):
    a, b = ranks2(_with_diloco)
    assert_same(a, b, exact=True)  # parameters (from the global copy) and state agree after the round


def _state_missing_on_one_rank():
    # Rank 1's second layer never gets a gradient: AdamW creates no state for it there.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=2, average_optimizer_state=True)
    x = torch.ones(3, 4)
    with pytest.raises(LayoutMismatchError) as info:
        for _ in range(2):
            opt.zero_grad()
            out = model(x) if dist.get_rank() == 0 else model[0](x)
            out.sum().backward()
            opt.step()
    dist.barrier()  # nobody is stuck in a collective
    return str(info.value)


def test_ranks_with_different_state_raise_on_every_rank(ranks2):
    for message in ranks2(_state_missing_on_one_rank):
        assert "optimizer state 'exp_avg' of parameter (param group 0, index 2)" in message


@pytest.mark.parametrize("kwargs", [{"compression": "bf16"}, {"overlap_steps": 2}])
def test_not_with_compression_or_overlap(kwargs):
    model = make_model()
    with pytest.raises(ValueError, match="average_optimizer_state with compression or overlap_steps is not supported"):
        LocalSGDOptimizer(INNER["adamw"](model.parameters()), k=4, average_optimizer_state=True, **kwargs)


def test_must_be_a_bool():
    with pytest.raises(TypeError, match="average_optimizer_state must be True or False, got 1"):
        LocalSGDOptimizer(INNER["adamw"](make_model().parameters()), k=4, average_optimizer_state=1)


class Payload(TorchDispatchMode):
    """Bytes this rank hands to all-reduces inside the block."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "allreduce_":
            self.bytes += sum(t.numel() * t.element_size() for t in args[0])
        return func(*args, **(kwargs or {}))


def _bytes_per_round(average_state):
    model = make_model(seed=dist.get_rank())
    opt = LocalSGDOptimizer(INNER["adamw"](model.parameters()), k=2, average_optimizer_state=average_state)
    payload = Payload()
    for step, (x, y) in enumerate(make_batches(2), start=1):
        opt.zero_grad()
        mse(model(x), y).backward()
        if step == 2:
            with payload:
                opt.step()  # the scheduled round
        else:
            opt.step()
    return payload.bytes, sum(p.numel() * p.element_size() for p in model.parameters())


def test_adamw_state_triples_the_bytes_of_a_round(ranks2):
    (plain, nbytes), _ = ranks2(_bytes_per_round, False)
    (with_state, _), _ = ranks2(_bytes_per_round, True)
    assert plain == nbytes and with_state == 3 * nbytes  # parameters, exp_avg, exp_avg_sq
