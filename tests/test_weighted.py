"""Weighted means (``step(tokens=)``): each rank's contribution weighted by the work it did since the
last round, against a per-parameter oracle, bit for bit, on real gloo ranks.

The rule the oracle writes out, one parameter at a time (``reference.weighing``): ranks whose total
is 0 send nothing; if the others' totals are equal, the round is the plain mean over them; otherwise
each sends ``w_r * x_r``, the sum is divided by ``sum(w_r)``. If every total is 0, the plain mean over
all. With compression, ``w_r * v_r`` is encoded and the residual keeps ``(w_r * v_r - sent) / w_r``.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from helpers import INNER, assert_same, make_batches, make_model, mse, params_of
from reference import (
    _int8_exchange,
    all_reduce_exchange,
    chunked_exchange,
    reference_error_feedback,
    reference_streaming,
    weighing,
)

K = 3


@torch.no_grad()
def _weighted_one_by_one(tensors, weights):
    mine, divisor = weighing(weights, dist.get_rank())
    for t in tensors:
        if mine == 0:
            t.zero_()
        elif mine is not None:
            t.mul_(mine)
        dist.all_reduce(t)
        t.div_(divisor)


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


# -- with compression: every compressor against its per-tensor reference, weighted --------------------------

def _compressors():
    from localsgd_optim import quantize, topk

    return {  # name: (compression, the reference's exchange, its feedback)
        "bf16": ("bf16", all_reduce_exchange(torch.bfloat16), 0.0),
        "int8": ("int8", _int8_exchange, 1.0),
        **{name: (spec, chunked_exchange(spec), spec.feedback) for name, spec in {
            "topk10_fp32": topk(0.1, chunk=512),
            "topk3_2bit": topk(0.03, bits=2, chunk=1000),  # short last chunks
            "topk5_8bit": topk(0.05, bits=8, chunk=64),  # uint8 positions
            "int4": quantize(4, chunk=300),
            "int2": quantize(2),
            "topk1_2bit_decayed": topk(0.01, bits=2, feedback=0.9),
        }.items()},
    }


def _compressed(compression, weights, steps):
    """Our rounds with ``compression``; ``weights``: every rank's total at each round (None: no tokens)."""
    from localsgd_optim import LocalSGDOptimizer, diloco

    model = make_model(seed=dist.get_rank())
    opt = LocalSGDOptimizer(INNER["adamw"](model.parameters()), k=K, outer_optimizer=diloco(0.7, 0.9),
                            compression=compression, bucket_cap_mb=0.01)
    for step, (x, y) in enumerate(make_batches(steps), start=1):
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step(tokens=None if weights is None else weights[(step - 1) // K][dist.get_rank()] // K)
    entry = opt.state_dict()["local_sgd"]
    residuals = entry.get("ef_residuals", entry.get("int8_residuals", []))
    return params_of(model), [r.clone() for r in residuals]


def _compressed_parity(weights) -> list[str]:
    """Each compressor's weighted rounds against the reference loop; returns the compressors that differ."""
    steps, differ = K * len(weights), []
    for name, (compression, exchange, feedback) in _compressors().items():
        ours, residuals = _compressed(compression, weights, steps)
        ref = make_model(seed=dist.get_rank())
        from localsgd_optim import diloco

        ref_residuals = reference_error_feedback(ref, INNER["adamw"](ref.parameters()), make_batches(steps), K,
                                                 diloco(0.7, 0.9), exchange, feedback, weights=weights)
        same = all(torch.equal(a, b) for a, b in zip(ours, params_of(ref), strict=True))
        if residuals:  # (bf16 keeps none)
            same = same and all(torch.equal(a, b) for a, b in zip(residuals, ref_residuals, strict=True))
        if not same:
            differ.append(name)
    return differ


@pytest.mark.parametrize("world, weights", [(2, [[6, 15], [15, 3]]), (3, [[12, 6, 0], [3, 0, 9]])])
def test_weighted_compressed_rounds_equal_the_per_tensor_references(world, weights, request):
    """Two rounds with different totals: the second carries the first's residuals, and at 3 ranks rank 1
    (total 0 in the second) keeps its own. Parameters and residuals bit for bit. (At 3 ranks, one total
    is 0 in each round: gloo sums three bf16 values in another order than the reference's all-reduce.)"""
    for differ in request.getfixturevalue(f"ranks{world}")(_compressed_parity, weights):
        assert differ == [], differ


def _equal_weights_compress_as_unweighted() -> list[str]:
    differ = []
    for name, (compression, _, _) in _compressors().items():
        weighted = _compressed(compression, [[9, 9, 9], [9, 9, 9]], 2 * K)
        plain = _compressed(compression, None, 2 * K)
        if not all(torch.equal(a, b) for a, b in zip(weighted[0] + weighted[1], plain[0] + plain[1], strict=True)):
            differ.append(name)
    return differ


def test_equal_weights_with_compression_are_the_unweighted_rounds(ranks3):
    for differ in ranks3(_equal_weights_compress_as_unweighted):
        assert differ == [], differ


# -- with fragments and with FSDP2 shards ---------------------------------------------------------------------

def _fragments_parity(tokens):
    """fragments=2, k=4, DiLoCo: each fragment's round covers 2 steps, so its totals are 2 x ``tokens``."""
    from localsgd_optim import LocalSGDOptimizer, diloco

    batches = make_batches(12)
    ref = make_model(seed=dist.get_rank())
    reference_streaming(ref, INNER["adamw"](ref.parameters()), batches, 4, [[0, 1], [2, 3, 4, 5]], diloco(),
                        weights=[2 * t for t in tokens])
    model = make_model(seed=dist.get_rank())
    opt = LocalSGDOptimizer(INNER["adamw"](model.parameters()), k=4, fragments=2, outer_optimizer=diloco(),
                            bucket_cap_mb=0.01)
    for x, y in batches:
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step(tokens=tokens[dist.get_rank()])
    return params_of(ref), params_of(model)


@pytest.mark.parametrize("tokens", [[1, 4], [0, 5]])
def test_weighted_fragments_equal_the_fragment_by_fragment_reference(ranks2, tokens):
    for ref, got in ranks2(_fragments_parity, tokens):
        assert_same(got, ref, exact=True)


def _fsdp2_weighted(strategy: str):
    """A (replicate=2, shard=2) mesh; replica 0 (ranks 0, 1) reports 2 tokens a step, replica 1 (ranks 2,
    3) 5: the replicate groups {0, 2} and {1, 3} weigh their rounds 8 : 20."""
    from localsgd_optim import LocalSGDOptimizer, diloco, topk
    from test_sharded import _fsdp2, _locals, _mesh, _shards

    compression = {"diloco": (None, all_reduce_exchange(), 0.0),
                   "topk2bit": (topk(0.05, bits=2, chunk=64), None, 1.0)}[strategy][0]
    mesh, batches, tokens = _mesh(), make_batches(8), [2, 2, 5, 5]
    model = _fsdp2(mesh)
    opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=4, process_group=mesh["replicate"],
                            bucket_cap_mb=0.001, outer_optimizer=diloco(), compression=compression)
    for x, y in batches:
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step(tokens=tokens[dist.get_rank()])
    ref = _fsdp2(mesh)
    group = mesh.get_group("replicate")
    exchange, feedback = ((all_reduce_exchange(), 0.0) if compression is None
                          else (chunked_exchange(compression), compression.feedback))
    reference_error_feedback(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2), batches, 4, diloco(), exchange,
                             feedback, params=_locals(ref), group=group, weights=[[8, 20]] * 2)
    return _shards(model), _shards(ref)


@pytest.mark.parametrize("strategy", ["diloco", "topk2bit"])
def test_weighted_fsdp2_replicas_equal_the_reference(ranks4, strategy):
    for ours, expected in ranks4(_fsdp2_weighted, strategy):
        assert_same(ours, expected, exact=True)
