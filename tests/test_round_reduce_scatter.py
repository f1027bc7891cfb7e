"""Issue 34, part 4: dense low-bit rounds as a reduce-scatter of the codes (ZeRO++'s qgZ) with a second,
per-owner residual, against a tensor-by-tensor reference; weighted rounds, resume, a new world size, and
bad settings."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist

from helpers import assert_same, make_batches, make_model, params_of, resume_run, train_wrapped
from localsgd_optim import Compression, LocalSGDOptimizer, diloco, quantize
from localsgd_optim.rounds.chunked import SHARD_RESIDUALS_KEY
from reference import reference_reduce_scatter_diloco

RS = "reduce_scatter"
SPECS = {
    "int4": quantize(4, chunk=300, collective=RS),  # short last chunks; shards of whole chunks
    "int2_one_chunk_buckets": quantize(2, chunk=4096, collective=RS),  # a bucket of fewer chunks than ranks
    "dense8_decayed": quantize(8, chunk=500, feedback=0.9, collective=RS),
}
K = 4


def _assembled(saved: dict, every: list[dict]) -> list[torch.Tensor]:
    """Every rank's second residuals, bucket by bucket, shard by shard: the model's flat order."""
    pieces = sorted(((pos, a, r) for entry in every for (pos, a, _), r in zip(entry["shards"], entry["residuals"])),
                    key=lambda piece: piece[:2])
    return [torch.cat([r for _, _, r in pieces])]


def _parity(spec, weights, cap):
    batches = make_batches(K * (3 if weights is None else len(weights)))
    ref = make_model(seed=dist.get_rank())
    first, second = reference_reduce_scatter_diloco(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2), batches, K,
                                                    diloco(0.7, 0.9), spec, weights=weights)
    model = make_model(seed=dist.get_rank())
    opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=K, compression=spec,
                            outer_optimizer=diloco(0.7, 0.9), bucket_cap_mb=cap)
    for step, (x, y) in enumerate(batches, start=1):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step(tokens=None if weights is None else weights[(step - 1) // K][dist.get_rank()] // K)
    entry = opt.state_dict()["local_sgd"]
    mine = entry[SHARD_RESIDUALS_KEY]
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return (params_of(ref), params_of(model), first, entry["ef_residuals"],
            [torch.cat([s.reshape(-1) for s in second])], _assembled(mine, every), opt.stats()["bytes_sent"])


@pytest.mark.parametrize("ranks", [2, 3], indirect=True)
@pytest.mark.parametrize("name", list(SPECS))
def test_reduce_scatter_matches_the_tensor_by_tensor_reference_exactly(ranks, name):
    """Bit for bit at 2 and 3 ranks: the all-to-all and the all-gather move bytes, and every sum is made
    by one rank, in rank order, from zero; no collective sums anything."""
    results = ranks(_parity, SPECS[name], None, 0.01)
    for ref, got, ref_first, first, ref_second, second, sent in results:
        assert_same(got, ref, exact=True)
        assert_same(first, ref_first, exact=True)
        assert_same(second, ref_second, exact=True)
        assert second[0].abs().sum() > 0  # the second stage carries something
        assert sent > 0
    for result in results[1:]:
        assert_same(result[1], results[0][1], exact=True)  # the replicas are identical


@pytest.mark.parametrize("world, weights", [(2, [[8, 20], [20, 4], [0, 8]]), (3, [[12, 8, 0], [4, 0, 12], [4, 4, 4]])])
def test_weighted_rounds_and_a_rank_of_weight_zero_match_the_reference(world, weights, request):
    """Weights are every rank's total per round (multiples of K: tokens per step). A rank of weight 0 sends zeros in stage 1 and keeps its first residual, but still owns, averages
    and requantizes its shard."""
    for ref, got, ref_first, first, ref_second, second, _ in request.getfixturevalue(f"ranks{world}")(
            _parity, quantize(4, chunk=300, collective=RS), weights, 0.01):
        assert_same(got, ref, exact=True)
        assert_same(first, ref_first, exact=True)
        assert_same(second, ref_second, exact=True)


def _build():
    model = make_model(seed=0)
    return model, LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=K,
                                    compression=quantize(4, chunk=256, collective=RS), outer_optimizer=diloco(),
                                    bucket_cap_mb=0.01)


def _resume():
    uninterrupted, resumed, ckpt = resume_run(_build, make_batches(14), 10)  # rounds at 4 and 8: stopped mid-period
    saved = ckpt["opt"]["local_sgd"][SHARD_RESIDUALS_KEY]
    return uninterrupted, resumed, saved["world_size"], sum(r.abs().sum().item() for r in saved["residuals"])


def test_resume_mid_period_continues_exactly_second_residuals_included(ranks2):
    for uninterrupted, resumed, world, mass in ranks2(_resume):
        assert world == 2 and mass > 0  # the checkpoint carries real second residuals
        assert_same(resumed, uninterrupted, exact=True)


def _saved_on_two():
    model, opt = _build()
    train_wrapped(model, opt, make_batches(6))
    return model.state_dict(), opt.state_dict()


def _load_on_three(states):
    model, opt = _build()
    state = states[dist.get_rank() % 2]
    model.load_state_dict(state[0])
    opt.load_state_dict(state[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_wrapped(model, opt, make_batches(2))  # step 8: a round over 3 ranks
    entry = opt.state_dict()["local_sgd"]
    same_first = all(torch.equal(a, b) for a, b in zip(entry["ef_residuals"], state[1]["local_sgd"]["ef_residuals"]))
    return [str(w.message) for w in caught], entry[SHARD_RESIDUALS_KEY]["world_size"], same_first


def test_another_world_size_restarts_the_second_residuals_with_a_warning(ranks2, ranks3):
    states = ranks2(_saved_on_two)
    for messages, world, _ in ranks3(_load_on_three, states):
        assert world == 3
        assert any("second-stage (mean shard) residuals were kept by rank" in m and "of 2" in m
                   and "start from zero" in m for m in messages), messages


def test_consolidate_drops_the_second_residuals(ranks2):
    from localsgd_optim import checkpoint

    states = [{"opt": s[1]} for s in ranks2(_saved_on_two)]
    merged = checkpoint.consolidate(states)["opt"]["local_sgd"]
    assert SHARD_RESIDUALS_KEY not in merged and "ef_residuals" in merged


@pytest.mark.parametrize("make, match", [
    (lambda: Compression(fraction=0.1, bits=2, collective=RS), r"collective='reduce_scatter' needs dense quantization.*fraction=0.1"),
    (lambda: quantize(4, collective="ring"), r"collective must be 'all_gather' or 'reduce_scatter', got 'ring'"),
])
def test_bad_collectives_name_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_the_collective_is_part_of_the_settings_and_the_default_prints_as_before():
    assert str(quantize(4)) == "quantize(4, chunk=4096)"
    assert str(quantize(4, collective=RS)) == "quantize(4, chunk=4096, collective='reduce_scatter')"
    assert quantize(4, collective=RS).settings() != quantize(4).settings()


def test_a_malformed_checkpoint_entry_is_refused():
    model, opt = _build()
    state = opt.state_dict()
    state["local_sgd"][SHARD_RESIDUALS_KEY] = {"world_size": 2, "rank": 0, "shards": [[0, 0, 3]],
                                               "residuals": [torch.zeros(4)]}
    with pytest.raises(ValueError, match=r"'ef_shard_residuals' of the Local SGD entry must be.*drop the key"):
        opt.load_state_dict(state)


def _bf16_params():
    model = make_model(seed=dist.get_rank(), dtype=torch.bfloat16)
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), k=2,
                            compression=quantize(4, chunk=256, collective=RS), bucket_cap_mb=0.01)
    train_wrapped(model, opt, make_batches(4, dtype=torch.bfloat16))
    return params_of(model), [r.dtype for r in opt.state_dict()["local_sgd"][SHARD_RESIDUALS_KEY]["residuals"]]


def test_bf16_parameters_reduce_scatter_and_agree(ranks3):
    """A bf16 bucket's mean is summed, requantized and decoded in an fp32 buffer, then rounded once."""
    results = ranks3(_bf16_params)
    for params, dtypes in results:
        assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in params)
        assert set(dtypes) == {torch.float32}
    for params, _ in results[1:]:
        assert_same(params, results[0][0], exact=True)
