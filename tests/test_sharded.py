"""Sharded replicas: FSDP2, tensor-parallel DTensors and FSDP1, averaged shard by shard over the replicas.

Four real gloo ranks form a (replicate=2, shard=2) mesh: ranks 0 and 2 hold shard 0 of
replicas 0 and 1, ranks 1 and 3 shard 1. The oracle is the same sharded model stepped by the
plain inner optimizer, whose local shards (``p.to_local()``) are averaged one parameter at a
time over ``mesh.get_group("replicate")`` by the loops of ``reference.py``. Averaging is
elementwise, so a shard's mean is exactly the slice of the full tensors' mean: these runs
equal "average the full tensors replica by replica" bit for bit, except int8, whose
per-tensor scale is per local shard (the reference quantizes shard by shard too).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from helpers import make_batches, mse, train_wrapped
from localsgd_optim import LayoutMismatchError, LocalSGDOptimizer, diloco
from localsgd_optim import _sharded
from localsgd_optim.rounds.fragments import split_fragments
from reference import (
    reference_diloco,
    reference_int8_diloco,
    reference_overlapped,
    reference_rounds,
    reference_streaming,
)


def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))


def _module(seed: int = 0) -> nn.Module:
    # The middle layer has 5 rows: 3 + 2 over two shards, so shard 1 carries a padding row.
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 5), nn.Tanh(), nn.Linear(5, 4))


def _fsdp2(mesh, seed: int = 0, **kwargs) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = _module(seed)
    fully_shard(model[0], mesh=mesh["shard"], **kwargs)
    fully_shard(model[2], mesh=mesh["shard"], **kwargs)
    fully_shard(model, mesh=mesh["shard"], **kwargs)  # the root group: model[4]
    return model


def _locals(model) -> list[torch.Tensor]:
    with torch.no_grad():  # views of the local shards, written in place by the reference
        return [p.to_local() for p in model.parameters()]


def _shards(model) -> list[torch.Tensor]:
    return [t.detach().clone() for t in _locals(model)]


def _state(inner) -> list[torch.Tensor]:
    return [v._local_tensor for p in inner.param_groups[0]["params"]
            for k, v in sorted(inner.state[p].items()) if k != "step"]


OPTIONS = {
    "plain": {},
    "diloco": {"outer_optimizer": diloco()},
    "bf16": {"outer_optimizer": diloco(), "compression": "bf16"},
    "int8": {"outer_optimizer": diloco(), "compression": "int8"},
    "overlap": {"outer_optimizer": diloco(), "overlap_steps": 1},
    "fragments": {"outer_optimizer": diloco(), "fragments": 2},
    "state": {"average_optimizer_state": True},
}


def _reference(strategy, model, inner, batches, group):
    params = _locals(model)
    if strategy == "plain":
        reference_rounds(model, inner, batches, {4, 8}, tensors=params, group=group)
    elif strategy == "state":
        reference_rounds(model, inner, batches, {4, 8}, tensors=params, group=group, state=_state)
    elif strategy in ("diloco", "bf16"):
        reference_diloco(model, inner, batches, 4, diloco(), wire=torch.bfloat16 if strategy == "bf16" else None,
                         params=params, group=group)
    elif strategy == "int8":
        reference_int8_diloco(model, inner, batches, 4, diloco(), params=params, group=group)
    elif strategy == "overlap":
        reference_overlapped(model, inner, batches, 4, 1, 0.5, diloco(), params=params, group=group)
    else:
        fragments = [list(range(lo, hi)) for lo, hi in split_fragments(params, 2)]
        reference_streaming(model, inner, batches, 4, fragments, diloco(), params=params, group=group)


def _fsdp2_parity(strategy: str, flat_params: bool = True, fallback: str | None = None):
    mesh = _mesh()
    batches = make_batches(8)
    _sharded.FALLBACK_REASON = fallback
    try:
        model = _fsdp2(mesh)
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
        opt = LocalSGDOptimizer(inner, k=4, process_group=mesh["replicate"], bucket_cap_mb=0.001,
                                flat_params=flat_params, **OPTIONS[strategy])
        train_wrapped(model, opt, batches)
        ours = _shards(model)
        staged = len(opt.engine.storage.staged_tensors()) if opt.engine.storage is not None else None
    finally:
        _sharded.FALLBACK_REASON = None
    ref = _fsdp2(mesh)
    ref_inner = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    _reference(strategy, ref, ref_inner, batches, mesh.get_group("replicate"))
    expected = _shards(ref)
    full = [p.full_tensor() for p in model.parameters()]  # (a collective over the shard group)
    pad = [fp._sharded_param_data[fp.sharded_param._local_tensor.numel():].clone()
           for m in (model[0], model[2], model) for g in m._get_fsdp_state()._fsdp_param_groups for fp in g.fsdp_params]
    return ours, expected, full, pad, staged


@pytest.mark.parametrize("strategy", list(OPTIONS))
def test_fsdp2_replicas_average_like_the_reference(ranks4, strategy):
    results = ranks4(_fsdp2_parity, strategy)
    for ours, expected, _, pad, staged in results:
        for i, (a, e) in enumerate(zip(ours, expected, strict=True)):
            torch.testing.assert_close(a, e, rtol=0, atol=0, msg=f"{strategy}: parameter {i}")
        assert all(bool((p == 0).all()) for p in pad), "the padding row stayed zero"
        assert staged == 0, "zero-copy: no shard is staged"
    if strategy not in ("overlap", "fragments"):  # (their last round lands, or covers a fragment, later)
        for a, b in zip(results[0][2], results[2][2]):  # replicas 0 and 1 end identical after step 8's round
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fsdp2_fallback_copy_path_is_exact(ranks4):
    """With FSDP's private attributes unusable, each shard is staged: same numbers, not zero-copy."""
    for ours, expected, _, _, staged in ranks4(_fsdp2_parity, "diloco", True, "forced by the test"):
        for a, e in zip(ours, expected, strict=True):
            torch.testing.assert_close(a, e, rtol=0, atol=0)
        assert staged == 6, "every shard staged"


def test_fsdp2_copy_engine_is_exact(ranks4):
    for ours, expected, _, _, staged in ranks4(_fsdp2_parity, "plain", False):
        for a, e in zip(ours, expected, strict=True):
            torch.testing.assert_close(a, e, rtol=0, atol=0)
        assert staged is None
