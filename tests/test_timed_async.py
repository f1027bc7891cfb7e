"""Asynchronous time-budgeted rounds (``round_every_s`` with ``overlap_steps``): each replica launches
its round when its own period is spent, control collective included, and trains on; nobody waits for
a slower replica at the launch. The round lands ``overlap_steps`` of the replica's own steps later (or
at its next launch, whichever comes first), weighted by each replica's tokens.

As in test_timed.py, each rank's clock moves by hand (rank ``r``: ``COST[r]`` seconds per step), so
the step counts are exact and the parameters compare bit for bit with a plain-loop oracle.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from helpers import INNER, make_batches, make_model, mse
from test_timed import COST, T, _Clock
from test_weighted import _weighted_one_by_one, weighted_round

ROUNDS = 3
MIX = 0.5  # overlap_mix's default


def _build(model, clock, overlap: int):
    from localsgd_optim import LocalSGDOptimizer, diloco

    opt = LocalSGDOptimizer(INNER["adamw"](model.parameters()), round_every_s=T, overlap_steps=overlap,
                            outer_optimizer=diloco(0.7, 0.9))
    opt._cursor.clock = clock
    opt._cursor.seek(0)  # the period starts on the test's clock
    return opt


def _ours(overlap: int, weighted: bool = True, resume_at: tuple | None = None, wait_for: tuple | None = None):
    """Launch ROUNDS rounds, then ``land()`` the last one and ``sync()``; return the parameters, the
    launch steps and the landing steps. ``wait_for=(rank, step, setter_step, key)``: that rank waits, before that
    step, until the other rank sets ``key`` in the store at its step ``setter_step``."""
    rank, cost, clock = dist.get_rank(), COST[dist.get_rank()], _Clock()
    model = make_model()
    opt = _build(model, clock, overlap)
    batches, launches, landings = iter(make_batches(100)), [], []
    while opt.num_rounds < ROUNDS:
        if wait_for is not None and rank == wait_for[0] and opt.num_steps + 1 == wait_for[1]:
            dist.distributed_c10d._get_default_store().wait([wait_for[3]], timedelta(seconds=60))
        x, y = next(batches)
        opt.zero_grad()
        mse(model(x), y).backward()
        clock.now += cost
        rounds, pending = opt.num_rounds, opt._cursor.landing
        opt.step(tokens=1 if weighted else None)
        if pending is not None and opt._cursor.landing != pending:
            landings.append(opt.num_steps)
        if opt.num_rounds > rounds:
            launches.append(opt.num_steps)
        if wait_for is not None and rank != wait_for[0] and opt.num_steps == wait_for[2]:
            dist.distributed_c10d._get_default_store().set(wait_for[3], "1")
        if resume_at is not None and opt.num_steps == resume_at[rank]:  # a round in flight: its mean travels
            state, weights = opt.state_dict(), {k: v.clone() for k, v in model.state_dict().items()}
            clock = _Clock()
            clock.now = 500.0
            opt = _build(model, clock, overlap)
            model.load_state_dict(weights)
            opt.load_state_dict(state)
    opt.land()
    opt.sync()
    return [p.detach().clone() for p in model.parameters()], launches, landings


def _oracle(overlap: int, weighted: bool = True):
    """Plain loop, one parameter and one collective at a time: this rank's own period (T / cost steps);
    at a launch, ``w x (global - p)`` summed over the ranks (blocking: the oracle may wait); at the
    landing, divided by the total weight, the outer step, ``p <- lerp(p, global, 1 - mix)``; a landing
    due after the next launch happens at that launch, first. Then sync(): the plain mean."""
    period = round(T / COST[dist.get_rank()])
    model = make_model()
    inner = INNER["adamw"](model.parameters())
    params = list(model.parameters())
    global_copy = [p.detach().clone() for p in params]
    outer = torch.optim.SGD(global_copy, lr=0.7, momentum=0.9, nesterov=True)
    total = torch.tensor([period if weighted else 1])
    dist.all_reduce(total)  # every rank's work per period is its period: the weights' sum
    pending, land_at, launches, step, batches = None, -1, 0, 0, iter(make_batches(100))

    def land(sums):
        with torch.no_grad():
            for g, d in zip(global_copy, sums):
                g.grad = d / total.item()
            outer.step()
            for g, p in zip(global_copy, params):
                g.grad = None
                p.lerp_(g, 1.0 - MIX)

    while launches < ROUNDS:
        step += 1
        x, y = next(batches)
        inner.zero_grad()
        mse(model(x), y).backward()
        inner.step()
        if step % period == 0:
            if pending is not None:
                land(pending)
            with torch.no_grad():
                pending = [(g - p) * (period if weighted else 1) for g, p in zip(global_copy, params)]
                for d in pending:
                    dist.all_reduce(d)
            launches, land_at = launches + 1, step + overlap
        elif step == land_at:
            land(pending)
            pending = None
    if pending is not None:
        land(pending)
    with torch.no_grad():
        _weighted_one_by_one(params, [1] * dist.get_world_size())  # sync(): the plain mean
    return [p.detach().clone() for p in params]


def _compare(overlap: int, weighted: bool = True, resume_at: tuple | None = None, wait_for: tuple | None = None):
    ours, launches, landings = _ours(overlap, weighted, resume_at, wait_for)
    oracle = _oracle(overlap, weighted)
    if dist.get_world_size() > 2:  # gloo's sum order over 3 ranks depends on an element's place in a bucket
        same = all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(ours, oracle))
    else:
        same = all(torch.equal(a, b) for a, b in zip(ours, oracle))
    return same, launches, landings


def test_rounds_land_overlap_steps_later_weighted_by_work(ranks2):
    # rank 0: a period of 6 steps, lands 2 steps after each launch; rank 1: 3 steps, lands 2 after
    (same0, launches0, landings0), (same1, launches1, landings1) = ranks2(_compare, 2)
    assert (launches0, landings0) == ([6, 12, 18], [8, 14])
    assert (launches1, landings1) == ([3, 6, 9], [5, 8])
    assert same0 and same1


def test_a_round_still_in_flight_at_the_next_launch_lands_there_first(ranks2):
    # overlap 4 > rank 1's period of 3: its rounds land at its next launch, before it goes out
    (same0, _, landings0), (same1, launches1, landings1) = ranks2(_compare, 4)
    assert landings0 == [10, 16]
    assert (launches1, landings1) == ([3, 6, 9], [6, 9])
    assert same0 and same1


def test_three_replicas_three_speeds(ranks3):
    for same, _, _ in ranks3(_compare, 1):
        assert same


def test_unweighted_asynchronous_rounds_divide_by_the_replicas(ranks2):
    for same, _, _ in ranks2(_compare, 2, False):
        assert same


def test_a_checkpoint_with_a_round_in_flight_continues_exactly(ranks2):
    # Both between their launches of round 1 and its landing, one step in: rank 0 at step 7 (launched
    # at 6, lands at 8), rank 1 at step 4 (launched at 3, lands at 5); the mean travels in the checkpoint
    for same, _, _ in ranks2(_compare, 2, True, (7, 4)):
        assert same


def test_a_launch_waits_for_no_other_replica(ranks2):
    # Rank 1 takes its launching step 3 only once rank 0 has taken two steps past its own launch at
    # step 6. Had rank 0's launch waited for rank 1's, neither would move (the store's wait times out).
    key = f"rank0-two-steps-past-its-launch-{uuid.uuid4()}"
    for same, _, _ in ranks2(_compare, 3, True, None, (1, 3, 8, key)):
        assert same


def _disagree(case: str):
    from localsgd_optim import LocalSGDError

    model, clock = make_model(), _Clock()
    opt = _build(model, clock, 1)
    rank = dist.get_rank()
    for x, y in make_batches(6):
        opt.zero_grad()
        mse(model(x), y).backward()
        clock.now += 6.0  # a round at every step
        if case == "nan" and rank == 1 and opt.num_steps == 0:
            with torch.no_grad():
                next(model.parameters())[0].fill_(float("nan"))
        if case == "freeze" and rank == 1 and opt.num_steps == 0:  # another layout: data of another size
            list(model.parameters())[-1].requires_grad_(False)
        try:
            opt.step(tokens=1 if case != "tokens" or rank == 0 else None)
        except (LocalSGDError, ValueError) as e:  # raised at the landing (step 2), on every rank
            return opt.num_steps, type(e).__name__, str(e)
    return opt.num_steps, None, ""


@pytest.mark.parametrize("case,error,says", [
    ("tokens", "ScheduleMismatchError", "passed step(tokens=...)"),
    ("nan", "NonFiniteParameterError", "NaN/Inf parameters"),
])
def test_a_disagreement_raises_on_every_rank_when_the_round_lands(case, error, says, ranks2):
    for steps, name, message in ranks2(_disagree, case):
        assert (steps, name) == (2, error), message
        assert says in message


def test_a_rank_whose_parameters_change_sends_in_the_agreed_layout_and_every_rank_raises(ranks2):
    # Rank 1 freezes a parameter before its first round: its own error, and rank 0 told which rank
    # failed, both when the round lands; its data went out in the layout agreed at binding (zeros),
    # so no collective saw buffers of another size.
    (steps0, name0, message0), (steps1, name1, message1) = ranks2(_disagree, "freeze")
    assert (steps0, name0, steps1, name1) == (2, "LocalSGDError", 2, "ValueError"), (message0, message1)
    assert "rank(s) [1] failed while preparing" in message0 and "parameters changed" in message1


def _consolidated():
    """Each rank saves right after launching round 1 (rank 0 at step 6, rank 1 at step 3), then both
    load the consolidated checkpoint and land the round at rank 0's landing step."""
    from localsgd_optim import checkpoint

    rank, clock = dist.get_rank(), _Clock()
    model = make_model()
    opt = _build(model, clock, 2)
    batches = iter(make_batches(100))
    while opt.num_rounds < 1:
        x, y = next(batches)
        opt.zero_grad()
        mse(model(x), y).backward()
        clock.now += COST[rank]
        opt.step(tokens=1)
    mine = {"model": model.state_dict(), "opt": opt.state_dict()}
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    state = checkpoint.consolidate(states)
    entry = state["opt"]["local_sgd"]
    flight = entry["in_flight"]
    same_mean = all(torch.equal(a, b) for a, b in zip(flight["mean_delta"], mine["opt"]["local_sgd"]["in_flight"]["mean_delta"]))
    model = make_model()
    model.load_state_dict(state["model"])
    opt = _build(model, _Clock(), 2)
    opt.load_state_dict(state["opt"])
    landing = opt._cursor.landing
    for x, y in [next(batches) for _ in range(2)]:
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step(tokens=1)
    return entry["num_steps"], entry["rounds"], flight["apply_at"], same_mean, landing, opt._rounds.scheduled.pending


def test_consolidate_takes_rank0s_steps_and_landing_with_a_round_in_flight(ranks2):
    for steps, rounds, apply_at, same_mean, landing, pending in ranks2(_consolidated):
        assert (steps, rounds, apply_at, landing) == (6, 1, 8, 8)
        assert same_mean  # the in-flight mean is the same on every rank: kept as it is
        assert not pending  # landed at step 8 on both
