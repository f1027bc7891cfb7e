"""Streaming rounds (fragments=P): parity with a fragment-by-fragment loop, bytes, resume, Join, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from helpers import assert_same, assert_state_equal, make_batches, make_model, params_of, resume_run, train_wrapped
from localsgd_optim import LocalSGDOptimizer, diloco
from localsgd_optim.rounds.fragments import split_fragments
from reference import reference_streaming

# make_model's parameters hold 1024, 64, 4096, 64, 256 and 4 elements. Balanced by bytes, 2
# fragments split after the second (1088 of 5508 is nearer half than 5184), and 3 fragments
# after the second and the third.
FRAGMENTS = {2: [[0, 1], [2, 3, 4, 5]], 3: [[0, 1], [2], [3, 4, 5]]}


def test_split_is_contiguous_and_balanced_by_bytes():
    params = list(make_model().parameters())
    for p, expected in FRAGMENTS.items():
        assert [list(range(lo, hi)) for lo, hi in split_fragments(params, p)] == expected
    equal = [torch.zeros(10) for _ in range(8)]
    assert split_fragments(equal, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert split_fragments(equal, 8) == [(i, i + 1) for i in range(8)]  # every fragment non-empty
    lopsided = [torch.zeros(1000)] + [torch.zeros(1) for _ in range(3)]
    assert split_fragments(lopsided, 3) == [(0, 1), (1, 2), (2, 4)]


def _parity(p, outer, tau, dtype):
    batches = make_batches(14, dtype=dtype)
    ref = make_model(seed=dist.get_rank(), dtype=dtype)
    factory = diloco() if outer else None
    reference_streaming(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2), batches, 4, FRAGMENTS[p], factory, tau)
    model = make_model(seed=dist.get_rank(), dtype=dtype)
    opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=4, fragments=p,
                            outer_optimizer=factory, overlap_steps=tau, bucket_cap_mb=0.01)
    train_wrapped(model, opt, batches)
    return params_of(ref), params_of(model)


@pytest.mark.parametrize("p, outer, tau", [(2, False, 0), (3, False, 0), (2, True, 0), (3, True, 0), (2, True, 1)],
                         ids=["average-P2", "average-P3", "diloco-P2", "diloco-P3", "diloco-overlap-P2"])
def test_streaming_matches_fragment_by_fragment_reference(ranks, p, outer, tau):
    for ref, got in ranks(_parity, p, outer, tau, torch.float32):
        assert_same(got, ref, exact=ranks.world_size == 2)


def _bf16_parity():
    batches = make_batches(14)
    ref = make_model(seed=dist.get_rank())
    reference_streaming(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2), batches, 4, FRAGMENTS[2], diloco(),
                        wire=torch.bfloat16)
    model = make_model(seed=dist.get_rank())
    opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=4, fragments=2,
                            outer_optimizer=diloco(), compression="bf16", bucket_cap_mb=0.01)
    train_wrapped(model, opt, batches)
    return params_of(ref), params_of(model)


def test_streaming_with_bf16_deltas_matches_reference(ranks):
    for ref, got in ranks(_bf16_parity):  # 3 ranks: gloo's bf16 sums in another order (bf16 ulps)
        assert_same(got, ref, exact=ranks.world_size == 2, rtol=1e-2, atol=1e-3)


def _halves():
    torch.manual_seed(dist.get_rank())  # different replicas: only averaging makes them equal
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), k=4, fragments=2)
    g = torch.Generator().manual_seed(dist.get_rank())
    out = {}
    for step in range(1, 5):
        opt.zero_grad()
        model(torch.randn(4, 8, generator=g)).pow(2).mean().backward()
        opt.step()
        out[step] = params_of(model)
    return out


def test_four_linears_two_fragments_sync_their_halves_at_staggered_steps(ranks2):
    a, b = ranks2(_halves)
    same = lambda step, layers: all(torch.equal(x, y) for x, y in zip(a[step][layers], b[step][layers]))  # noqa: E731
    first, second = slice(0, 4), slice(4, 8)  # two Linear(8, 8) each: 144 of 288 elements
    assert same(2, first) and not same(2, second)  # step 2: fragment 0 synced
    assert not same(3, first)  # a local step since
    assert same(4, first) is False and same(4, second)  # step 4: fragment 1 synced
    assert not same(1, first) and not same(1, second)


def _bytes_per_round(p, outer):
    model = make_model(seed=0)
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), k=8, fragments=p,
                            outer_optimizer=diloco() if outer else None, bucket_cap_mb=0.01)
    per_round, before = {}, 0
    for step, (x, y) in enumerate(make_batches(16), start=1):
        train_wrapped(model, opt, [(x, y)])
        sent = opt.stats()["bytes_sent"]
        if sent != before:
            per_round[step] = sent - before
        before = sent
    return per_round


def _int8_bytes(p):
    model = make_model(seed=0)
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), k=8, fragments=p, compression="int8")
    rounds = []
    for x, y in make_batches(8):
        before = opt.stats()["bytes_sent"]
        train_wrapped(model, opt, [(x, y)])
        if opt.stats()["bytes_sent"] != before:
            rounds.append(opt.stats()["bytes_sent"] - before)
    return rounds, params_of(model)


def test_int8_streaming_sends_each_fragment_s_codes(ranks2):
    (whole, _), _ = ranks2(_int8_bytes, 1)
    (parts, params), (_, other) = ranks2(_int8_bytes, 2)
    numel = [p.numel() for p in make_model().parameters()]
    # one int8 code per element and one fp32 scale per tensor, per fragment
    assert whole == [sum(numel) + 4 * len(numel)]
    assert parts == [sum(numel[:2]) + 8, sum(numel[2:]) + 16]
    assert_same(params[2:], other[2:], exact=True)  # step 8 synced the last fragment: it agrees
    assert not torch.equal(params[0], other[0])  # the first synced at step 4, 4 local steps ago


@pytest.mark.parametrize("outer", [False, True], ids=["average", "diloco"])
def test_each_round_moves_its_fragment_s_bytes(ranks2, outer):
    sizes = [p.numel() * 4 for p in make_model().parameters()]
    whole = ranks2(_bytes_per_round, 1, outer)[0]
    assert whole == {8: sum(sizes), 16: sum(sizes)}
    for p in (2, 3):
        got = ranks2(_bytes_per_round, p, outer)[0]
        fragment_bytes = [sum(sizes[j] for j in idx) for idx in FRAGMENTS[p]]
        expected = {8 * period + 8 * (i + 1) // p: b for period in range(2) for i, b in enumerate(fragment_bytes)}
        assert got == expected
        assert max(got.values()) < 0.95 * sum(sizes)  # the peak per round drops


def _resume(outer, tau, stop):
    def build():
        model = make_model(seed=0)
        return model, LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=4, fragments=2,
                                        outer_optimizer=diloco() if outer else None, overlap_steps=tau)

    uninterrupted, resumed, ckpt = resume_run(build, make_batches(14), stop)
    return uninterrupted, resumed, ckpt["opt"]["local_sgd"]


@pytest.mark.parametrize("outer, tau, stop", [(False, 0, 7), (True, 0, 9), (True, 1, 10)],
                         ids=["average", "diloco", "diloco-in-flight"])
def test_mid_period_resume_is_bit_exact(ranks, outer, tau, stop):
    for uninterrupted, resumed, entry in ranks(_resume, outer, tau, stop):
        assert_same(resumed, uninterrupted, exact=True)
        assert len(entry["fragments"]) == 2
        if tau:  # launched at step 10 (fragment 0), landing at 11: in flight in the checkpoint
            assert "in_flight" in entry["fragments"][0] and "in_flight" not in entry["fragments"][1]


def _join(outer):
    from torch.distributed.algorithms import Join

    counts = {2: [10, 13], 3: [10, 13, 12]}[dist.get_world_size()]
    mine = make_batches(counts[dist.get_rank()])
    factory = diloco() if outer else None
    ref = make_model(seed=0)
    reference_streaming(ref, torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9), mine, 4, FRAGMENTS[2],
                        factory, counts=counts)
    model = make_model(seed=0)
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), k=4, fragments=2,
                            outer_optimizer=factory)
    with Join([opt]):
        train_wrapped(model, opt, mine)
    return params_of(ref), params_of(model), opt.num_steps


@pytest.mark.parametrize("outer", [False, True], ids=["average", "diloco"])
def test_join_with_uneven_inputs_matches_reference(ranks, outer):
    for ref, got, num_steps in ranks(_join, outer):
        assert num_steps == 13
        assert_same(got, ref, exact=ranks.world_size == 2)


def _mismatched_fragments():
    model = make_model(seed=0)
    saved = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), k=4, fragments=2,
                              outer_optimizer=diloco()).state_dict()
    other = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), k=4, fragments=3, outer_optimizer=diloco())
    before = other.state_dict()
    try:
        other.load_state_dict(saved)
    except ValueError as e:
        assert_state_equal(other.state_dict(), before)  # nothing changed
        return str(e)
    return None


def test_checkpoint_with_another_fragment_count_is_refused(ranks2):
    for message in ranks2(_mismatched_fragments):
        assert message is not None and "one dict per fragment (3), got 2 fragment entries" in message


@pytest.mark.parametrize("kwargs, match", [
    ({"fragments": 0}, r"fragments must be an integer >= 1 \(1: the whole model at once\), got 0"),
    ({"fragments": 2.0}, r"fragments must be an integer >= 1"),
    ({"fragments": 5, "k": 4}, r"fragments=5 needs an integer k >= fragments .* got k=4; pass k >= 5"),
    ({"fragments": 2, "k": [(10, 4), (None, 8)]}, r"fragments=2 needs an integer k >= fragments"),
    ({"fragments": 2, "local_k": 2, "local_group": "g"}, r"fragments with hierarchical averaging"),
    ({"fragments": 2, "average_optimizer_state": True}, r"fragments with average_optimizer_state"),
    ({"fragments": 2, "k": 8, "overlap_steps": 4},
     r"overlap_steps=4 with fragments=2 and k=8: .* 4 step\(s\) later .* pass overlap_steps < 4"),
    ({"fragments": 7, "k": 8}, r"fragments=7 needs at least as many parameters, got 6; pass fragments <= 6"),
])
def test_bad_fragment_settings_are_refused(kwargs, match):
    model = make_model()
    kwargs = {"k": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_add_param_group_is_refused_with_fragments():
    model, extra = make_model(), nn.Linear(2, 2)
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), k=4, fragments=2)
    with pytest.raises(ValueError, match=r"add_param_group is not supported with .*fragments"):
        opt.add_param_group({"params": list(extra.parameters())})
