"""Time-budgeted rounds (``round_every_s``): replicas at different speeds take different step counts
per period, meet at every round, and (with ``step(tokens=)``) weigh each other by their work.

Most tests drive each rank's clock by hand: rank ``r``'s clock advances ``COST[r]`` seconds per step,
so the step counts its speed implies are exact (a period of ``T`` seconds is ``T / COST[r]`` steps)
and the parameters can be compared bit for bit with a plain-loop oracle that runs those counts. One
test runs the real clock, with sleeps, and asserts only what holds whatever the timing.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from helpers import INNER, make_batches, make_model, mse
from test_weighted import weighted_round

T = 6.0
COST = [1.0, 2.0, 3.0]  # seconds per step on ranks 0, 1, 2: periods of 6, 3 and 2 steps
ROUNDS = 3


class _Clock:
    """A clock that moves only when the test says: one step's cost at a time."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _build(model, clock, method="plain", warmup=0, **kw):
    from localsgd_optim import LocalSGDOptimizer, diloco

    opt = LocalSGDOptimizer(INNER["adamw"](model.parameters()), round_every_s=T, warmup_steps=warmup,
                            outer_optimizer=diloco(0.7, 0.9) if method == "diloco" else None, **kw)
    opt._cursor.clock = clock
    opt._cursor.seek(0)  # the period starts on the test's clock
    return opt


def _ours(method: str, resume: bool = False, weighted: bool = True, warmup: int = 0, elastic: str | None = None):
    """Train until ROUNDS rounds are done; return the parameters and the step count of each round
    (``elastic``: the mid-period restart goes through an ElasticCheckpoint in that directory)."""
    cost, clock = COST[dist.get_rank()], _Clock()
    model = make_model()
    opt = _build(model, clock, method, warmup)
    batches, at_rounds = iter(make_batches(100)), []
    while opt.num_rounds < ROUNDS:
        x, y = next(batches)
        opt.zero_grad()
        mse(model(x), y).backward()
        clock.now += cost  # the step's time
        rounds = opt.num_rounds
        opt.step(tokens=1 if weighted else None)
        if opt.num_rounds > rounds:
            at_rounds.append(opt.num_steps)
        if resume and at_rounds and opt.num_steps == at_rounds[0] + 1:  # one step into the second period:
            # every rank rebuilds between the same rounds; the round count and the period's time travel along
            if elastic is not None:  # labelled by the round count, which every replica shares
                from localsgd_optim.elastic import ElasticCheckpoint

                with ElasticCheckpoint(elastic) as ckpt:
                    ckpt.save(opt.num_rounds, model, opt, blocking=True)
            else:
                state, weights = opt.state_dict(), {k: v.clone() for k, v in model.state_dict().items()}
            clock = _Clock()  # a new process: its clock starts anywhere
            clock.now = 1000.0
            opt = _build(model, clock, method)  # (its broadcast is undone by the checkpoint)
            if elastic is not None:
                with ElasticCheckpoint(elastic) as ckpt:
                    assert ckpt.resume(model, opt).step == 1
            else:
                model.load_state_dict(weights)
                opt.load_state_dict(state)
    return [p.detach().clone() for p in model.parameters()], at_rounds


def _oracle(method: str, periods: list[int], weighted: bool = True, warmup: int = 0):
    """Plain loop: this rank's own step counts per period, then a round weighted by them, one
    parameter and one collective at a time."""
    model = make_model()
    inner = INNER["adamw"](model.parameters())
    params = list(model.parameters())
    global_copy = [p.detach().clone() for p in params]
    outer = torch.optim.SGD(global_copy, lr=0.7, momentum=0.9, nesterov=True)
    batches = iter(make_batches(100))
    for x, y in [next(batches) for _ in range(warmup)]:  # synchronous warmup: a plain mean after each step
        inner.zero_grad()
        mse(model(x), y).backward()
        inner.step()
        weighted_round("plain", params, None, None, [1] * dist.get_world_size())
    for g, p in zip(global_copy, params):
        g.data.copy_(p.detach())
    everyone = [[0] * len(periods) for _ in range(dist.get_world_size())]
    dist.all_gather_object(everyone, periods)  # every rank's work in each period: the weights
    for i, n in enumerate(periods):
        for _ in range(n):
            x, y = next(batches)
            inner.zero_grad()
            mse(model(x), y).backward()
            inner.step()
        weights = [row[i] for row in everyone] if weighted else [1] * len(everyone)
        weighted_round(method, params, global_copy, outer, weights)
    return [p.detach().clone() for p in params]


def _compare(method: str, resume: bool = False, weighted: bool = True, warmup: int = 0, elastic: str | None = None):
    ours, at_rounds = _ours(method, resume, weighted, warmup, elastic)
    per_period = round(T / COST[dist.get_rank()])
    expected = [warmup + per_period * (i + 1) for i in range(ROUNDS)]
    periods = [b - a for a, b in zip([warmup] + at_rounds, at_rounds)]
    oracle = _oracle(method, periods, weighted, warmup)
    if dist.get_world_size() > 2:  # gloo's sum order over 3 ranks depends on where an element sits in a
        return at_rounds == expected, all(torch.allclose(a, b, rtol=1e-6, atol=1e-7)  # bucket: 1 ulp apart
                                          for a, b in zip(ours, oracle)), at_rounds
    return at_rounds == expected, all(torch.equal(a, b) for a, b in zip(ours, oracle)), at_rounds


@pytest.mark.parametrize("method", ["plain", "diloco"])
def test_each_replica_takes_the_steps_its_speed_implies_and_the_round_weighs_them(method, ranks2):
    for counts_ok, same, at_rounds in ranks2(_compare, method):
        assert counts_ok, at_rounds
        assert same


def test_three_speeds_three_step_counts(ranks3):
    for counts_ok, close, at_rounds in ranks3(_compare, "diloco"):
        assert counts_ok, at_rounds
        assert close


def test_unweighted_time_budgeted_rounds_are_the_plain_mean(ranks2):
    for counts_ok, same, at_rounds in ranks2(_compare, "plain", False, False):
        assert counts_ok and same, at_rounds


def test_warmup_is_step_counted_and_the_budget_starts_after_it(ranks2):
    for counts_ok, same, at_rounds in ranks2(_compare, "plain", False, True, 4):
        assert counts_ok, at_rounds
        assert same


def test_a_mid_period_checkpoint_continues_the_period(ranks2):
    for counts_ok, same, at_rounds in ranks2(_compare, "diloco", True):
        assert counts_ok, at_rounds
        assert same


def test_an_elastic_checkpoint_labelled_by_round_continues_the_period(ranks2, tmp_path):
    # the ranks save at different step counts (7 and 4) under one label: the round count
    for counts_ok, same, at_rounds in ranks2(_compare, "diloco", True, True, 0, str(tmp_path)):
        assert counts_ok, at_rounds
        assert same


def _real_clock(seconds: float, delay: float):
    from localsgd_optim import LocalSGDOptimizer

    model = make_model()
    opt = LocalSGDOptimizer(INNER["sgd"](model.parameters()), round_every_s=seconds)
    batches, steps = iter(make_batches(1000)), []
    while opt.num_rounds < 3:
        x, y = next(batches)
        opt.zero_grad()
        mse(model(x), y).backward()
        time.sleep(delay * (1 + dist.get_rank()))
        rounds = opt.num_rounds
        opt.step(tokens=8)
        if opt.num_rounds > rounds:
            steps.append(opt.num_steps)
    opt.sync()
    return steps, [p.detach().clone() for p in model.parameters()]


def test_real_clocks_meet_at_every_round(ranks3):
    """Three speeds on the real clock: every rank runs the same rounds and leaves identical (what the
    timing does not change), each taking at least one step per period."""
    results = ranks3(_real_clock, 0.15, 0.01)
    for steps, params in results:
        assert len(steps) == 3 and all(b > a for a, b in zip([0] + steps, steps)), steps
        assert all(torch.equal(a, b) for a, b in zip(params, results[0][1]))


def _out_of_step() -> str:
    from localsgd_optim import LocalSGDOptimizer

    clock = _Clock()
    model = make_model()
    opt = _build(model, clock)
    try:
        for x, y in make_batches(12):
            opt.zero_grad()
            mse(model(x), y).backward()
            clock.now += 1.0
            opt.step()
            if dist.get_rank() == 0 and opt.num_rounds == 1:
                opt.sync()  # rank 0 alone: it meets rank 1's second round
    except Exception as e:  # noqa: BLE001 - the message is the result
        return f"{type(e).__name__}: {e}"
    return "no error"


def test_ranks_out_of_round_raise_on_every_rank(ranks2):
    for message in ranks2(_out_of_step):
        assert "ScheduleMismatchError" in message and "at round 1" in message and "opt.num_rounds" in message, message


def test_bad_settings_name_the_argument():
    from localsgd_optim import LocalSGDOptimizer

    def build(**kw):
        return LocalSGDOptimizer(INNER["sgd"](make_model().parameters()), **kw)

    with pytest.raises(ValueError, match=r"round_every_s must be a finite number of seconds > 0, got 0"):
        build(round_every_s=0)
    with pytest.raises(ValueError, match=r"k=4 and round_every_s=2.0 both say when to average"):
        build(k=4, round_every_s=2.0)
    with pytest.raises(ValueError, match=r"round_every_s with local_k=2 is not supported"):
        build(round_every_s=2.0, local_k=2, local_group=object())
    with pytest.raises(ValueError, match=r"round_every_s with overlap_steps=1 and fragments=2 is not supported yet"):
        build(round_every_s=2.0, overlap_steps=1, fragments=2)
    with pytest.raises(ValueError, match=r"round_every_s with overlap_steps=1 and buffers= is not supported"):
        build(round_every_s=2.0, overlap_steps=1, buffers=make_model())
    opt = build(round_every_s=2.0)
    assert opt.round_every_s == 2.0 and opt.k is None and "round_every_s=2.0" in repr(opt)
    from torch.distributed.algorithms.join import Join

    with pytest.raises(Exception, match=r"cannot shadow other ranks under Join"):
        Join([opt])


def test_alone_it_counts_rounds_by_the_clock():
    clock = _Clock()
    opt = _build(make_model(), clock)
    for _ in range(13):
        clock.now += 1.5
        opt.step()
    assert (opt.num_steps, opt.num_rounds) == (13, 3)  # rounds at steps 4, 8 and 12
    assert opt.state_dict()["local_sgd"]["rounds"] == 3
    assert opt.state_dict()["local_sgd"]["period_spent_s"] == 1.5
    with opt.paused():  # an evaluation: the period's clock stands still
        clock.now += 100.0
        with opt.paused():  # (pauses nest)
            clock.now += 10.0
        clock.now += 10.0
        assert opt.state_dict()["local_sgd"]["period_spent_s"] == opt.period_spent_s == 1.5
    for _ in range(2):
        clock.now += 1.5
        opt.step()
    assert (opt.num_steps, opt.num_rounds) == (15, 3)
    clock.now += 1.5
    opt.step()
    assert (opt.num_steps, opt.num_rounds) == (16, 4)


def test_checkpoints_between_the_two_kinds_of_schedule():
    from localsgd_optim import LocalSGDOptimizer

    model = make_model()
    counted = LocalSGDOptimizer(INNER["adamw"](model.parameters()), k=2)
    for x, y in make_batches(5, rank=0):
        mse(model(x), y).backward()
        counted.step()
    timed = _build(make_model(), _Clock())
    with pytest.warns(UserWarning, match=r"saved with k=2; this optimizer has round_every_s=6.0"), \
            pytest.warns(UserWarning, match=r"round count \(num_rounds\) starts at 0"):
        timed.load_state_dict(counted.state_dict())
    assert (timed.num_steps, timed.num_rounds) == (5, 0)
    state = timed.state_dict()
    for key, bad, message in (("rounds", -1, "must be an integer >= 0"),
                              ("period_spent_s", float("inf"), "must be a finite number >= 0"),
                              ("tokens_since_round", "lots", "must be an integer >= 0")):
        broken = {**state, "local_sgd": {**state["local_sgd"], key: bad}}
        fresh = _build(make_model(), _Clock())
        with pytest.raises(ValueError, match=rf"\['{key}'\] {message}"):
            fresh.load_state_dict(broken)
        assert fresh.num_steps == 0 and not fresh.optimizer.state  # checked before anything changed


def _saved_at_different_steps():
    clock, model = _Clock(), make_model()
    opt = _build(model, clock)
    for x, y in make_batches(2 * round(T / COST[dist.get_rank()])):  # two periods: rank 0 12 steps, rank 1 6
        mse(model(x), y).backward()
        clock.now += COST[dist.get_rank()]
        opt.step(tokens=3)
    return {"model": model.state_dict(), "opt": opt.state_dict()}


def test_consolidate_takes_time_budgeted_checkpoints(ranks2):
    from localsgd_optim.checkpoint import consolidate

    states = ranks2(_saved_at_different_steps)
    assert [s["opt"]["local_sgd"]["num_steps"] for s in states] == [12, 6]
    merged = consolidate(states)
    entry = merged["opt"]["local_sgd"]
    assert (entry["num_steps"], entry["rounds"]) == (12, 2)
    opt = _build(make_model(), _Clock())
    opt.load_state_dict(merged["opt"])
    assert (opt.num_steps, opt.num_rounds) == (12, 2)


def _fragments(timed: bool, costs: list[float]):
    """DiLoCo in 2 fragments: time-budgeted (T=4: a round every 2 s, fragments in turn) or every k=4 steps."""
    from localsgd_optim import LocalSGDOptimizer, diloco

    cost, clock, model = costs[dist.get_rank()], _Clock(), make_model()
    when = {"round_every_s": 4.0} if timed else {"k": 4}
    opt = LocalSGDOptimizer(INNER["adamw"](model.parameters()), **when, fragments=2, outer_optimizer=diloco(0.7, 0.9))
    if timed:
        opt._cursor.clock = clock
        opt._cursor.seek(0)
    synced, batches = [], iter(make_batches(12))
    while opt.num_rounds < 6 if timed else opt.num_steps < 12:  # (time-budgeted: end on rounds)
        x, y = next(batches)
        opt.zero_grad()
        mse(model(x), y).backward()
        clock.now += cost
        rounds = opt.num_rounds
        opt.step()
        if opt.num_rounds > rounds:
            synced.append((opt.num_steps, opt._cursor.fragment()))
    return synced, [p.detach().clone() for p in model.parameters()]


def _fragments_match():
    timed, counted = _fragments(True, [1.0, 1.0]), _fragments(False, [1.0, 1.0])
    return timed[0] == counted[0], all(torch.equal(a, b) for a, b in zip(timed[1], counted[1]))


def test_fragments_in_turn_equal_the_step_counted_streaming_rounds_at_equal_speeds(ranks2):
    for same_rounds, same_params in ranks2(_fragments_match):
        assert same_rounds and same_params


def test_fragments_at_different_speeds_sync_the_same_fragment_in_each_round(ranks2):
    (fast, _), (slow, _) = ranks2(_fragments, True, [1.0, 2.0])
    assert [f for _, f in fast] == [f for _, f in slow] == [0, 1, 0, 1, 0, 1]
    assert [s for s, _ in fast] == [2, 4, 6, 8, 10, 12] and [s for s, _ in slow] == [1, 2, 3, 4, 5, 6]
