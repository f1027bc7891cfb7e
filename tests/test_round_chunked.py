"""Top-k and low-bit compression with error feedback (issue 26): parity with a tensor-by-tensor
reference, the error-feedback invariant, bit-identical replicas, resume, and bad settings."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from helpers import assert_same, make_batches, make_model, params_of, resume_run, train_wrapped
from localsgd_optim import LocalSGDOptimizer, diloco, quantize, topk
from localsgd_optim.compression import Compression
from reference import reference_chunked_diloco

SPECS = {
    "topk10_fp32": topk(0.1, chunk=512),
    "topk3_2bit": topk(0.03, bits=2, chunk=1000),  # tensors not multiples of the chunk: short last chunks
    "topk5_8bit_small_chunks": topk(0.05, bits=8, chunk=64),  # uint8 positions
    "int4": quantize(4, chunk=300),
    "int2": quantize(2, chunk=4096),
    "dense8": quantize(8, chunk=500),  # 8-bit codes: no packing, the offset on bytes
    "topk1_2bit_decayed": topk(0.01, bits=2, chunk=4096, feedback=0.9),
}
plain_average = lambda params: torch.optim.SGD(params, lr=1.0)  # noqa: E731


def _parity(spec, outer_name, cap, flat_params=True):
    outer = diloco() if outer_name == "diloco" else plain_average
    batches = make_batches(12)
    ref = make_model(seed=dist.get_rank())
    residuals = reference_chunked_diloco(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2), batches, 4, outer, spec)
    model = make_model(seed=dist.get_rank())
    opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=4, compression=spec,
                            outer_optimizer=outer if outer_name == "diloco" else None, bucket_cap_mb=cap,
                            flat_params=flat_params)
    train_wrapped(model, opt, batches)
    saved = opt.state_dict()["local_sgd"]["ef_residuals"]
    return params_of(ref), params_of(model), residuals, saved, opt.stats()["bytes_sent"]


@pytest.mark.parametrize("name", list(SPECS))
def test_chunked_matches_tensor_by_tensor_reference_exactly(ranks, name):
    spec = SPECS[name]
    outer, cap = ("diloco", 0.01) if "int" in name or "8bit" in name else ("plain", 25.0)
    results = ranks(_parity, spec, outer, cap)
    for ref, got, ref_res, res, sent in results:
        assert_same(got, ref, exact=True)
        assert_same(res, ref_res, exact=True)
        assert sum(r.abs().sum().item() for r in res) > 0  # error feedback is carrying something
    for _, got, _, _, _ in results[1:]:
        assert_same(got, results[0][1], exact=True)  # the replicas are identical after the last round


def test_copy_engine_matches_the_reference_too(ranks2):
    for ref, got, ref_res, res, _ in ranks2(_parity, topk(0.03, bits=2, chunk=1000), "diloco", 0.01, False):
        assert_same(got, ref, exact=True)
        assert_same(res, ref_res, exact=True)


def _ef_invariant(spec):
    """k=1 and inner SGD(lr=1) with gradients set by hand: each round's true delta is d (to rounding).
    Summed over ranks: sum of true deltas = W x (what the global copy moved) + sum of residuals."""
    torch.manual_seed(0)
    model = torch.nn.Linear(40, 30)
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), k=1, compression=spec)
    start = params_of(model)
    world = dist.get_world_size()
    g = torch.Generator().manual_seed(dist.get_rank())
    true = [torch.zeros_like(p) for p in start]
    identical = True
    for _ in range(6):
        for p, t in zip(model.parameters(), true):
            p.grad = torch.randn(p.shape, generator=g) * 0.01
            t.add_(p.grad)
        opt.step()
        for p in model.parameters():  # after every round, every rank holds the same bits
            others = [torch.empty_like(p) for _ in range(world)]
            dist.all_gather(others, p.detach())
            identical &= all(torch.equal(o, p) for o in others)
    residuals = opt.state_dict()["local_sgd"]["ef_residuals"]
    lhs, rhs = [], []
    for p0, p, t, e in zip(start, model.parameters(), true, residuals):
        t, e = t.clone(), e.clone()
        dist.all_reduce(t)
        dist.all_reduce(e)
        lhs.append(t)
        rhs.append((p0 - p.detach()) * world + e)
    return lhs, rhs, identical, sum(e.abs().sum().item() for e in residuals)


@pytest.mark.parametrize("spec", [topk(0.02, bits=2, chunk=128), quantize(2, chunk=100)], ids=["topk2bit", "int2"])
def test_error_feedback_loses_nothing(ranks, spec):
    for lhs, rhs, identical, mass in ranks(_ef_invariant, spec):
        assert identical
        assert mass > 0
        assert_same(rhs, lhs, exact=False, rtol=1e-5, atol=1e-6)


def _resume(spec, fragments):
    def build():
        model = make_model(seed=0)
        return model, LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=4, compression=spec,
                                        outer_optimizer=diloco(), fragments=fragments)

    uninterrupted, resumed, ckpt = resume_run(build, make_batches(14), 10)
    entry = ckpt["opt"]["local_sgd"]
    residuals = [r for sub in entry["fragments"] for r in sub["ef_residuals"]] if fragments > 1 \
        else entry["ef_residuals"]
    return uninterrupted, resumed, sum(r.abs().sum().item() for r in residuals)


@pytest.mark.parametrize("fragments", [1, 2])
def test_residuals_resume_bit_exact(ranks2, fragments):
    for uninterrupted, resumed, mass in ranks2(_resume, topk(0.05, bits=4, chunk=256), fragments):
        assert mass > 0  # the checkpoint carries real residuals
        assert_same(resumed, uninterrupted, exact=True)


def _count_round_ops(spec):
    from localsgd_optim.bench import build_model
    from test_flat import CountOps

    torch.manual_seed(0)
    model = build_model(48, 128)  # 576 parameter tensors, 36 MB: 2 buckets of 25 MB
    # the outer step as one foreach op (the default plain-average SGD steps tensor by tensor on CPU)
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.0, foreach=True), k=1, compression=spec,
                            outer_optimizer=lambda params: torch.optim.SGD(params, lr=1.0, foreach=True))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # the first round builds the plans and buffers
    with CountOps() as counter:
        opt.step()
    return len(opt.engine.buckets), dict(counter.ops)


@pytest.mark.parametrize("spec", [topk(0.01, bits=2), quantize(4)], ids=["topk2bit", "int4"])
def test_a_round_dispatches_one_all_gather_and_o_buckets_ops(ranks2, spec):
    for buckets, ops in ranks2(_count_round_ops, spec):
        assert buckets == 2
        gathers = sum(n for name, n in ops.items() if "allgather" in name or "all_gather" in name)
        assert gathers == buckets + 1, ops  # one per bucket, one for the control collective
        assert ops.get("topk", 0) <= buckets and ops.get("index_add_", 0) <= 3 * buckets, ops
        # 576 tensors, nothing per tensor but the outer step's ``.grad`` views (``detach``)
        assert sum(ops.values()) - ops.get("detach", 0) <= 100 * buckets + 60, ops


def test_payload_size_is_what_the_spec_says():
    """Bytes per rank and round of a 64x64 weight, a 64 bias, chunk 4096, top-1% at 2 bits:
    per chunk 41 values (2 bits each) + 41 int16 positions + one fp32 step."""
    from localsgd_optim.rounds.chunked import ChunkedReducer

    class Bucket:
        numel, offsets, device = 4096 + 64, [0, 4096], torch.device("cpu")

    reducer = ChunkedReducer([torch.zeros(64, 64), torch.zeros(64)], topk(0.01, bits=2))
    plan = reducer._plan(Bucket())
    parts = reducer._layout(plan)
    assert plan.sent == 41 + 1 and plan.chunks == 2
    assert parts["steps"] == (0, 8)
    assert parts["codes"] == (8, 8 + 11)  # ceil(42 * 2 / 8)
    assert parts["positions"] == (20, 20 + 84)
    assert parts["total"] == (0, 104)


@pytest.mark.parametrize("kwargs, match", [
    (dict(fraction=0.0), r"fraction must be a number in \(0, 1\]"),
    (dict(fraction=1.5), r"fraction must be a number in \(0, 1\].*got 1.5"),
    (dict(fraction=0.1, bits=3), r"bits must be 2, 4 or 8 \(None: fp32 values\), got 3"),
    (dict(fraction=1.0), r"topk\(1.0\) without bits"),
    (dict(fraction=0.1, chunk=0), r"chunk must be an integer in \[1, 32768\]"),
    (dict(fraction=0.1, chunk=40000), r"got 40000"),
    (dict(fraction=0.1, feedback=1.5), r"feedback must be a number in \[0, 1\]"),
])
def test_bad_settings_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Compression(**kwargs)


def test_quantize_needs_bits_and_unknown_names_are_refused():
    with pytest.raises(ValueError, match="quantize: bits must be 2, 4 or 8"):
        quantize(None)
    model = make_model()
    with pytest.raises(ValueError, match=r"compression must be None, 'bf16', 'int8', 'int4', 'int2'.*'int3'"):
        LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), k=4, compression="int3")


@pytest.mark.parametrize("kwargs, match", [
    (dict(overlap_steps=2), "overlap_steps with compression is not supported"),
    (dict(average_optimizer_state=True), "average_optimizer_state with compression or overlap_steps"),
])
def test_round_kinds_it_cannot_serve_are_refused(kwargs, match):
    model = make_model()
    with pytest.raises(ValueError, match=match):
        LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), k=4, compression=topk(0.01, bits=2), **kwargs)
    with pytest.raises(ValueError, match="buffers= is not supported"):
        LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), k=4, compression="int2", buffers=model)


def _saved_with_residuals():
    from test_consolidate import _saved

    model = make_model(seed=0)
    opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=4, compression=topk(0.05, bits=2))
    train_wrapped(model, opt, make_batches(6))  # a round at 4, mid-period at 6
    return _saved(model, opt)


def _resume_consolidated(state):
    model = make_model(seed=0)
    opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=4, compression=topk(0.05, bits=2))
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    loaded = [r.clone() for r in opt.state_dict()["local_sgd"]["ef_residuals"]]
    train_wrapped(model, opt, make_batches(2))  # step 8: a round
    return loaded, params_of(model)


def test_consolidate_averages_the_residuals_across_ranks(ranks2, ranks3):
    from localsgd_optim import checkpoint

    states = ranks2(_saved_with_residuals)
    state = checkpoint.consolidate(states)
    per_rank = [s["opt"]["local_sgd"]["ef_residuals"] for s in states]
    assert not torch.equal(per_rank[0][0], per_rank[1][0])  # each rank carries its own
    for i, merged in enumerate(state["opt"]["local_sgd"]["ef_residuals"]):
        torch.testing.assert_close(merged, (per_rank[0][i] + per_rank[1][i]) / 2, rtol=0, atol=0)
    results = ranks3(_resume_consolidated, state)  # 2 ranks saved, 3 resume
    for loaded, _ in results:
        assert_same(loaded, state["opt"]["local_sgd"]["ef_residuals"], exact=True)
    for _, final in results[1:]:
        assert_same(final, results[0][1], exact=True)


def _ranks_disagree():
    model = make_model(seed=0)
    spec = topk(0.01 * (dist.get_rank() + 1), bits=2)
    try:
        opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), k=2, compression=spec)
        train_wrapped(model, opt, make_batches(2))
    except Exception as e:  # noqa: BLE001 - the test inspects what every rank raised
        return type(e).__name__, str(e)
    return None


def test_ranks_with_different_compressors_all_raise(ranks2):
    for raised in ranks2(_ranks_disagree):
        assert raised is not None
        assert "topk(0.01, bits=2, chunk=4096)" in raised[1] and "topk(0.02, bits=2, chunk=4096)" in raised[1]


def _low_precision_params(dtype):
    torch.manual_seed(dist.get_rank())
    model = make_model(seed=dist.get_rank(), dtype=dtype)
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), k=2, compression=quantize(4, chunk=256))
    train_wrapped(model, opt, make_batches(4, dtype=dtype))
    return params_of(model), [r.dtype for r in opt.state_dict()["local_sgd"]["ef_residuals"]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bf16", "fp64"])
def test_bf16_and_fp64_parameters_compress_and_agree(ranks2, dtype):
    results = ranks2(_low_precision_params, dtype)
    for params, residual_dtypes in results:
        assert all(p.dtype == dtype and torch.isfinite(p).all() for p in params)
        assert set(residual_dtypes) == {torch.float32}  # error feedback accumulates in fp32
    assert_same(results[1][0], results[0][0], exact=True)
