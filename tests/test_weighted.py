"""Weighted means (``step(tokens=)``): each rank's contribution weighted by the work it did since the
last round, against a per-parameter oracle, bit for bit, on real gloo ranks.

The rule the oracle writes out, one parameter at a time: ranks whose total is 0 send nothing; if the
others' totals are equal, the round is the plain mean over them; otherwise each sends ``w_r * x_r``,
the sum is divided by ``sum(w_r)``. If every total is 0, the plain mean over all.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from helpers import INNER, make_batches, make_model, mse

K = 3


@torch.no_grad()
def _weighted_one_by_one(tensors, weights):
    if not any(weights):  # nobody reported work: the plain mean
        weights = [1] * len(weights)
    mine = weights[dist.get_rank()]
    sending = [w for w in weights if w > 0]
    equal = len(set(sending)) <= 1
    for t in tensors:
        if mine == 0:
            t.zero_()
        elif not equal:
            t.mul_(mine)
        dist.all_reduce(t)
        t.div_(len(sending) if equal else sum(sending))


def _oracle(method: str, weights: list[int], steps: int):
    """Plain loop: inner steps, a weighted round every K steps (plain: the parameters; DiLoCo: the
    pseudo-gradients, then the outer step), one parameter and one collective at a time."""
    model = make_model()
    inner = INNER["adamw"](model.parameters())
    params = list(model.parameters())
    global_copy = [p.detach().clone() for p in params]
    outer = torch.optim.SGD(global_copy, lr=0.7, momentum=0.9, nesterov=True)
    for step, (x, y) in enumerate(make_batches(steps), start=1):
        inner.zero_grad()
        mse(model(x), y).backward()
        inner.step()
        if step % K == 0:
            weighted_round(method, params, global_copy, outer, weights)
    return [p.detach().clone() for p in params]


@torch.no_grad()
def weighted_round(method: str, params, global_copy, outer, weights) -> None:
    """One weighted round, a parameter at a time: plain, the parameters; DiLoCo, the pseudo-gradients,
    then the outer step."""
    if method == "plain":
        _weighted_one_by_one(params, weights)
        return
    deltas = [g - p for g, p in zip(global_copy, params)]
    _weighted_one_by_one(deltas, weights)
    for g, d in zip(global_copy, deltas):
        g.grad = d
    outer.step()
    for g, p in zip(global_copy, params):
        g.grad = None
        p.copy_(g)


def _ours(method: str, weights: list[int] | None, steps: int, save_at: int | None = None):
    from localsgd_optim import LocalSGDOptimizer, diloco

    model = make_model()
    opt = LocalSGDOptimizer(INNER["adamw"](model.parameters()), k=K,
                            outer_optimizer=diloco(0.7, 0.9) if method == "diloco" else None)
    per_step = None if weights is None else weights[dist.get_rank()] // K  # the round's total: weights[rank]
    for step, (x, y) in enumerate(make_batches(steps), start=1):
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step(tokens=per_step)
        if step == save_at:  # mid-period: the tokens so far travel in the checkpoint
            state = opt.state_dict()
            opt = LocalSGDOptimizer(opt.optimizer, k=K,
                                    outer_optimizer=diloco(0.7, 0.9) if method == "diloco" else None,
                                    sync_on_init=False)
            opt.load_state_dict(state)
    return [p.detach().clone() for p in model.parameters()]


def _compare(method, weights, steps=2 * K, save_at=None):
    ours = _ours(method, weights, steps, save_at)
    return all(torch.equal(a, b) for a, b in zip(ours, _oracle(method, weights, steps)))


@pytest.mark.parametrize("method", ["plain", "diloco"])
@pytest.mark.parametrize("world, weights", [(2, [6, 15]), (3, [3, 0, 9]), (3, [6, 6, 0]), (2, [0, 0])])
def test_a_weighted_round_equals_the_per_parameter_oracle(method, world, weights, request):
    assert all(request.getfixturevalue(f"ranks{world}")(_compare, method, weights))


def _equal_weights_are_plain() -> bool:
    return all(torch.equal(a, b) for a, b in zip(_ours("diloco", [9, 9, 9], 2 * K), _ours("diloco", None, 2 * K)))


def test_equal_weights_are_exactly_the_plain_mean(ranks3):
    assert all(ranks3(_equal_weights_are_plain))


def test_the_tokens_of_a_period_survive_a_mid_period_checkpoint(ranks2):
    assert all(ranks2(_compare, "plain", [6, 15], 2 * K, K + 1))


def _mixed() -> str:
    from localsgd_optim import LocalSGDOptimizer

    model = make_model()
    opt = LocalSGDOptimizer(INNER["sgd"](model.parameters()), k=2)
    try:
        for x, y in make_batches(2):
            opt.zero_grad()
            mse(model(x), y).backward()
            opt.step(tokens=5 if dist.get_rank() == 0 else None)
    except Exception as e:  # noqa: BLE001 - the message is the result
        return f"{type(e).__name__}: {e}"
    return "no error"


def test_tokens_on_some_ranks_only_raises_on_every_rank(ranks2):
    for message in ranks2(_mixed):
        assert "ScheduleMismatchError" in message and "rank(s) [0] passed step(tokens=...)" in message, message


def test_tokens_must_be_a_count():
    from localsgd_optim import LocalSGDOptimizer

    model = make_model()
    opt = LocalSGDOptimizer(INNER["sgd"](model.parameters()), k=2)
    with pytest.raises(ValueError, match=r"tokens=...\) must be an integer >= 0 .* got -1"):
        opt.step(tokens=-1)
