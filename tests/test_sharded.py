"""Sharded replicas: FSDP2, tensor-parallel DTensors and FSDP1, averaged shard by shard over the replicas.

Four real gloo ranks form a (replicate=2, shard=2) mesh: ranks 0 and 2 hold shard 0 of
replicas 0 and 1, ranks 1 and 3 shard 1. The oracle is the same sharded model stepped by the
plain inner optimizer, whose local shards (``p.to_local()``) are averaged one parameter at a
time over ``mesh.get_group("replicate")`` by the loops of ``reference.py``. Averaging is
elementwise, so a shard's mean is exactly the slice of the full tensors' mean: these runs
equal "average the full tensors replica by replica" bit for bit, except int8 and top-k /
low-bit compression, whose scales and chunks are per local shard (the references compress shard
by shard too).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

from helpers import make_batches, mse, train_wrapped
from localsgd_optim import LayoutMismatchError, LocalSGDOptimizer, diloco, topk
from localsgd_optim import _sharded
from localsgd_optim.rounds.fragments import split_fragments
from reference import (
    reference_diloco,
    reference_chunked_diloco,
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
        return [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]


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
    "topk2bit": {"outer_optimizer": diloco(), "compression": topk(0.05, bits=2, chunk=64)},
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
    elif strategy == "topk2bit":
        reference_chunked_diloco(model, inner, batches, 4, diloco(), OPTIONS[strategy]["compression"],
                                 params=params, group=group)
    elif strategy == "overlap":
        reference_overlapped(model, inner, batches, 4, 1, 0.5, diloco(), params=params, group=group)
    else:
        fragments = [list(range(lo, hi)) for lo, hi in split_fragments(params, 2)]
        reference_streaming(model, inner, batches, 4, fragments, diloco(), params=params, group=group)


def _fsdp2_parity(strategy: str, flat_params: bool = True, fallback: str | None = None, offload: bool = False):
    mesh = _mesh()
    batches = make_batches(8)
    _sharded.FALLBACK_REASON = fallback
    kwargs = {}
    if offload:
        from torch.distributed.fsdp import CPUOffloadPolicy

        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=False)
    try:
        model = _fsdp2(mesh, **kwargs)
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt = LocalSGDOptimizer(inner, k=4, process_group=mesh["replicate"], bucket_cap_mb=0.001,
                                    flat_params=flat_params, **OPTIONS[strategy])
        told = [str(w.message) for w in caught if "copy path" in str(w.message)]
        train_wrapped(model, opt, batches)
        ours = _shards(model)
        staged = len(opt.engine.storage.staged_tensors()) if opt.engine.storage is not None else None
    finally:
        _sharded.FALLBACK_REASON = None
    ref = _fsdp2(mesh, **kwargs)
    ref_inner = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    _reference(strategy, ref, ref_inner, batches, mesh.get_group("replicate"))
    expected = _shards(ref)
    full = [p.full_tensor() for p in model.parameters()]  # (a collective over the shard group)
    pad = [fp._sharded_param_data[fp.sharded_param._local_tensor.numel():].clone()
           for m in (model[0], model[2], model) for g in m._get_fsdp_state()._fsdp_param_groups for fp in g.fsdp_params]
    return ours, expected, full, pad, staged, told


@pytest.mark.parametrize("strategy", list(OPTIONS))
def test_fsdp2_replicas_average_like_the_reference(ranks4, strategy):
    results = ranks4(_fsdp2_parity, strategy)
    for ours, expected, _, pad, staged, told in results:
        assert told == [], "zero-copy: no warning"
        for i, (a, e) in enumerate(zip(ours, expected, strict=True)):
            torch.testing.assert_close(a, e, rtol=0, atol=0, msg=f"{strategy}: parameter {i}")
        assert all(bool((p == 0).all()) for p in pad), "the padding row stayed zero"
        assert staged == 0, "zero-copy: no shard is staged"
    if strategy not in ("overlap", "fragments"):  # (their last round lands, or covers a fragment, later)
        for a, b in zip(results[0][2], results[2][2]):  # replicas 0 and 1 end identical after step 8's round
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fsdp2_fallback_copy_path_is_exact(ranks4):
    """With FSDP's private attributes unusable, each shard is staged: same numbers, not zero-copy."""
    for ours, expected, _, _, staged, told in ranks4(_fsdp2_parity, "diloco", True, "forced by the test"):
        assert len(told) == 1 and "forced by the test" in told[0], told
        for a, e in zip(ours, expected, strict=True):
            torch.testing.assert_close(a, e, rtol=0, atol=0)
        assert staged == 6, "every shard staged"


def test_fsdp2_cpu_offload_takes_the_copy_path_and_is_exact(ranks4):
    for ours, expected, _, _, staged, told in ranks4(_fsdp2_parity, "diloco", True, None, True):
        assert len(told) == 1 and "CPU offload" in told[0], told
        for a, e in zip(ours, expected, strict=True):
            torch.testing.assert_close(a, e, rtol=0, atol=0)
        assert staged == 6, "pinned host shards: every one staged"


def test_fsdp2_copy_engine_is_exact(ranks4):
    for ours, expected, _, _, staged, told in ranks4(_fsdp2_parity, "plain", False):
        assert told == [], "flat_params=False chose the copy engine: nothing to warn about"
        for a, e in zip(ours, expected, strict=True):
            torch.testing.assert_close(a, e, rtol=0, atol=0)
        assert staged is None


# -- the cost of a round: O(buckets) collectives and no copy, however many FSDP groups and tensors ----

def _count_sharded_round_ops():
    from torch.distributed.fsdp import fully_shard

    from localsgd_optim.bench import build_model
    from test_flat import CountOps

    mesh = _mesh()
    torch.manual_seed(0)
    model = build_model(8, 64)  # 8 encoder layers: 96 parameter tensors
    for layer in model.layers:
        fully_shard(layer, mesh=mesh["shard"])
    fully_shard(model, mesh=mesh["shard"])
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), k=1 << 30, process_group=mesh["replicate"])
    opt.sync()  # allocate what a round keeps
    with CountOps() as counter:
        opt.sync()
    return len(opt.engine.buckets), len(list(model.parameters())), dict(counter.ops)


def test_sharded_round_dispatches_o_buckets_ops_and_no_copy(ranks4):
    for buckets, tensors, ops in ranks4(_count_sharded_round_ops):
        assert tensors == 96 and buckets == 1, (buckets, tensors)  # 9 FSDP groups, one flat buffer
        assert ops.get("allreduce_", 0) == buckets, ops
        assert not any("copy" in name for name in ops), ops
        assert sum(ops.values()) <= buckets + 6, ops


# -- misuse raises on every rank, before any data moves -----------------------------------------

def _misuse(case: str):
    from torch.distributed.fsdp import fully_shard

    mesh = _mesh()
    if case == "hsdp":
        model = _module()
        fully_shard(model, mesh=mesh)  # native HSDP: 2-D mesh, gradients all-reduced across replicas
        group = mesh["replicate"]
    elif case == "fsdp1-world":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        model = FSDP(_module(), device_id=torch.device("cpu"))  # FULL_SHARD over all 4 ranks
        group = None
    else:
        model = _fsdp2(mesh)
        group = {"shard-group": mesh["shard"], "world": None, "2d-mesh": mesh}[case]
    before = _shards(model) if case != "fsdp1-world" else _plain_copies(model)
    try:
        LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), k=1, process_group=group)
        error = None
    except Exception as e:  # noqa: BLE001 - the test inspects it
        error = e
    dist.barrier()
    after = _shards(model) if case != "fsdp1-world" else _plain_copies(model)
    untouched = all(torch.equal(a, b) for a, b in zip(before, after))
    return type(error).__name__, str(error), untouched


@pytest.mark.parametrize("case,error,words", [
    ("2d-mesh", "ValueError", ["a 2-D mesh", "mesh['replicate']"]),
    ("shard-group", "ValueError", ["Shard(dim=0) over mesh dimension 'shard'", "process_group=mesh['replicate']"]),
    ("world", "LayoutMismatchError", ["at mesh coordinate [0] on rank 0", "at mesh coordinate [1] on rank 1"]),
    ("hsdp", "ValueError", ["native HSDP", "fully_shard(model, mesh=mesh['shard'])"]),
    ("fsdp1-world", "LayoutMismatchError", ["FSDP1 flat shard", "on rank 1"]),
], ids=["2d-mesh", "wrong-group", "world-group", "native-hsdp", "fsdp1-different-shards"])
def test_misuse_raises_on_every_rank(ranks4, case, error, words):
    for name, message, untouched in ranks4(_misuse, case):
        assert name == error, message
        for word in words:
            assert word in message, message
        assert untouched, "no shard changed"


# -- FSDP1 and tensor parallelism ------------------------------------------------------------------

def _plain_copies(model) -> list[torch.Tensor]:
    return [torch.empty(p.shape, dtype=p.dtype).copy_(p.detach()) for p in model.parameters()]  # (not FlatParameters)


def _fsdp1_parity():
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    mesh = _mesh()
    batches = make_batches(8)

    def build():
        return FSDP(_module(), device_id=torch.device("cpu"), process_group=mesh.get_group("shard"))

    model = build()
    opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=4, process_group=mesh["replicate"],
                            bucket_cap_mb=0.001)
    train_wrapped(model, opt, batches)
    ours = _plain_copies(model)
    from torch.distributed.fsdp._flat_param import FlatParameter

    flat = [isinstance(p, FlatParameter) for p in model.parameters()], len(opt.engine.storage.staged_tensors())
    ref = build()
    reference_rounds(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2), batches, {4, 8},
                     tensors=list(ref.parameters()), group=mesh.get_group("replicate"))
    expected = _plain_copies(ref)
    # zero-copy: FSDP1 reshards back to the flat storage's memory
    storage = opt.engine.storage.buffers[0]
    lives_there = all(p._local_shard.untyped_storage().data_ptr() == storage.untyped_storage().data_ptr()
                      for p in model.parameters())
    return ours, expected, flat, lives_there


def test_fsdp1_flat_parameters_average_in_place(ranks4):
    results = ranks4(_fsdp1_parity)
    for ours, expected, (kinds, staged), lives_there in results:
        assert kinds == [True] and staged == 0 and lives_there
        for a, e in zip(ours, expected, strict=True):
            torch.testing.assert_close(a, e, rtol=0, atol=0)
    torch.testing.assert_close(results[0][0], results[2][0], rtol=0, atol=0)  # replicas agree after step 8


def _tp_parity(strategy: str):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = _mesh()
    replica = mesh["replicate"].get_local_rank()
    batches = make_batches(8, rank=replica)  # tensor parallelism: both ranks of a replica see its batch

    def build():
        return parallelize_module(_module(), mesh["shard"], {"0": ColwiseParallel(), "2": RowwiseParallel()})

    model = build()
    opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=4, process_group=mesh["replicate"],
                            bucket_cap_mb=0.001, **OPTIONS[strategy])
    train_wrapped(model, opt, batches)
    ours = _shards(model)
    ref = build()
    _reference(strategy, ref, torch.optim.AdamW(ref.parameters(), lr=1e-2), batches, mesh.get_group("replicate"))
    return ours, _shards(ref), len(opt.engine.storage.staged_tensors())


@pytest.mark.parametrize("strategy", ["plain", "diloco"])
def test_tensor_parallel_replicas_average_like_the_reference(ranks4, strategy):
    for ours, expected, staged in ranks4(_tp_parity, strategy):
        assert staged == 0
        for a, e in zip(ours, expected, strict=True):
            torch.testing.assert_close(a, e, rtol=0, atol=0)


# -- FSDP2 lifecycle: an eval forward, a move, a replaced parameter -----------------------------------

def _eval_then_round():
    mesh = _mesh()
    model = _fsdp2(mesh)
    opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=100, process_group=mesh["replicate"])
    train_wrapped(model, opt, make_batches(3))
    x = make_batches(1, rank=0)[0][0]
    with torch.no_grad():
        model(x)  # the root group stays unsharded after a forward without backward
        opt.sync()  # writes the mean into the shards
        seen = model(x)  # must see the mean
        for m in (model[0], model[2], model):
            m.reshard()
        truth = model(x)
    return seen, truth


def test_eval_forward_then_round_is_seen_by_the_next_forward(ranks4):
    for seen, truth in ranks4(_eval_then_round):
        torch.testing.assert_close(seen, truth, rtol=0, atol=0)


def _moved_after_binding():
    # FSDP2 itself cannot change dtype once its lazy init (the first forward) has run: cast right after binding
    mesh = _mesh()
    group = mesh.get_group("replicate")
    batches = [(x.double(), y.double()) for x, y in make_batches(8)]
    model = _fsdp2(mesh)
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), k=4, process_group=group)
    bound_to = opt.engine.storage.buffers[0].dtype
    model.to(torch.float64)
    train_wrapped(model, opt, batches)
    ref = _fsdp2(mesh).to(torch.float64)
    reference_rounds(ref, torch.optim.SGD(ref.parameters(), lr=0.05), batches, {4, 8}, tensors=_locals(ref), group=group)
    storage = opt.engine.storage.buffers[0]
    lives_there = all(p._local_tensor.untyped_storage().data_ptr() == storage.untyped_storage().data_ptr()
                      for p in model.parameters())
    return _shards(model), _shards(ref), (bound_to, storage.dtype), lives_there


def test_model_to_after_binding_moves_the_shards_back_into_flat_storage(ranks4):
    for ours, expected, dtypes, lives_there in ranks4(_moved_after_binding):
        assert dtypes == (torch.float32, torch.float64) and lives_there
        for a, e in zip(ours, expected, strict=True):
            assert a.dtype == torch.float64
            torch.testing.assert_close(a, e, rtol=0, atol=0)


def _assign_load():
    mesh = _mesh()
    model = _fsdp2(mesh)
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), k=2, process_group=mesh["replicate"])
    train_wrapped(model, opt, make_batches(1))
    model.load_state_dict(model.state_dict(), assign=True)
    try:
        train_wrapped(model, opt, make_batches(1))
    except Exception as e:  # noqa: BLE001
        return type(e).__name__, str(e)
    return None, None


def test_replaced_fsdp2_parameters_are_refused(ranks4):
    for name, message in ranks4(_assign_load):
        assert name == "ValueError" and "(0.weight) was replaced" in message and "assign=True" in message, message


# -- checkpoints -------------------------------------------------------------------------------------

def _dcp_resume(path: str, strategy: str):
    import torch.distributed.checkpoint as dcp

    from localsgd_optim import checkpoint

    mesh = _mesh()
    batches = make_batches(14)

    def build():
        model = _fsdp2(mesh)
        opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=4, process_group=mesh["replicate"],
                                bucket_cap_mb=0.001, **OPTIONS[strategy])
        return model, opt

    model, opt = build()
    train_wrapped(model, opt, batches)
    uninterrupted = _shards(model)

    model, opt = build()
    train_wrapped(model, opt, batches[:10])  # step 10: mid-period, the replicas differ
    at_save = _shards(model)
    dcp.save({"train": checkpoint.get_state_dict(model, opt)}, checkpoint_id=path)

    model, opt = build()
    state = {"train": checkpoint.get_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=path)
    checkpoint.set_state_dict(model, opt, state["train"])
    loaded = _shards(model), opt.num_steps
    train_wrapped(model, opt, batches[10:])
    return uninterrupted, _shards(model), at_save, loaded


@pytest.mark.parametrize("strategy", ["diloco", "int8"])
def test_fsdp2_dcp_resume_mid_period_is_bit_exact(ranks4, tmp_path, strategy):
    results = ranks4(_dcp_resume, str(tmp_path / "ckpt"), strategy)
    for uninterrupted, resumed, at_save, (loaded, num_steps) in results:
        assert num_steps == 10
        for a, b in zip(loaded, at_save, strict=True):  # each rank got its own shard back
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for a, b in zip(resumed, uninterrupted, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(results[0][2][0], results[2][2][0]), "step 10 should be mid-period"


def _save_mid_period(path: str):
    from localsgd_optim import checkpoint

    mesh = _mesh()
    model = _fsdp2(mesh)
    opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=4, process_group=mesh["replicate"],
                            outer_optimizer=diloco())
    train_wrapped(model, opt, make_batches(6))  # step 6: two steps past the round at 4
    torch.save({"world_size": dist.get_world_size(), **checkpoint.rank_state(model, opt)},
               f"{path}/rank{dist.get_rank()}.pt")
    return _shards(model)


def _resume_as_one_replica(path: str):
    from torch.distributed.device_mesh import init_device_mesh

    from localsgd_optim import checkpoint

    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("replicate", "shard"))
    model = _fsdp2(mesh, seed=1)  # other weights: everything must come from the checkpoint
    opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=4, process_group=mesh["replicate"],
                            outer_optimizer=diloco())
    state, saved = checkpoint.load_per_rank(lambda r: f"{path}/rank{r}.pt", dist.get_rank(), 2, shards=2)
    checkpoint.load_rank_state(model, opt, state)
    loaded = _shards(model)
    train_wrapped(model, opt, make_batches(2))  # through the round at step 8
    return loaded, opt.num_steps, saved


def test_consolidate_across_a_change_in_the_number_of_replicas(ranks4, ranks2, tmp_path):
    saved = ranks4(_save_mid_period, str(tmp_path))
    for shard, (loaded, num_steps, saved_world) in enumerate(ranks2(_resume_as_one_replica, str(tmp_path))):
        assert num_steps == 8 and saved_world == 4
        a, b = saved[shard], saved[shard + 2]  # the replicas' copies of this shard (ranks s and s + 2)
        assert not all(torch.equal(x, y) for x, y in zip(a, b)), "saved mid-period: the replicas differ"
        for got, x, y in zip(loaded, a, b, strict=True):
            torch.testing.assert_close(got, (x + y) / 2, rtol=0, atol=0)


# -- docs/integrations.md: the "Sharded models" snippets run ---------------------------------------

def _run_doc_snippets():
    import re

    from helpers import ROOT

    text = (ROOT / "docs" / "integrations.md").read_text()
    out = {}
    for name, code in re.findall(r"<!-- sharded: ([\w-]+) -->\n```python\n(.*?)```", text, re.S):
        replica = dist.get_rank() // 2  # (tensor parallelism needs one batch per replica)
        ns = {"torch": torch, "nn": nn, "dist": dist, "model": _module(), "loss_fn": mse,
              "loader": make_batches(8, rank=replica)}
        exec(compile(code, f"integrations.md:{name}", "exec"), ns)  # noqa: S102 - our own documentation
        with torch.no_grad():
            local = [t.to_local() if hasattr(t, "to_local") else t for t in ns["model"].parameters()]
            local = [torch.empty(t.shape, dtype=t.dtype).copy_(t) for t in local]
        group = ns["mesh"].get_group("replicate")
        theirs = [torch.empty_like(t) for t in local]
        for mine, other in zip(local, theirs):  # the other replica's copy of this shard
            everyone = [torch.empty_like(mine) for _ in range(2)]
            dist.all_gather(everyone, mine, group=group)
            other.copy_(everyone[1 - dist.get_rank(group)])
        out[name] = all(torch.equal(a, b) for a, b in zip(local, theirs)), type(ns["opt"]).__name__
    return out


def test_integrations_doc_sharded_snippets_run_and_end_in_sync(ranks4):
    for out in ranks4(_run_doc_snippets):
        assert sorted(out) == ["fsdp1", "fsdp2", "tensor-parallel"]
        assert all(agree and kind == "LocalSGDOptimizer" for agree, kind in out.values()), out


def _resume_with_the_wrong_shards(path: str, how: str):
    from torch.distributed.device_mesh import init_device_mesh

    from localsgd_optim import checkpoint

    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("replicate", "shard"))
    model = _fsdp2(mesh, seed=1)
    opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=4, process_group=mesh["replicate"],
                            outer_optimizer=diloco())
    before = _shards(model)
    path_of = lambda r: f"{path}/rank{r}.pt"  # noqa: E731
    try:
        if how == "shards-forgotten":  # all 4 saved ranks averaged together: two different shards mixed
            checkpoint.load_per_rank(path_of, dist.get_rank(), 2)
        else:  # each rank given the other shard's file
            state = torch.load(path_of(1 - dist.get_rank()), weights_only=True)
            checkpoint.load_rank_state(model, opt, state)
        error = None
    except ValueError as e:
        error = str(e)
    return error, all(torch.equal(a, b) for a, b in zip(before, _shards(model)))


@pytest.mark.parametrize("how", ["shards-forgotten", "other-shard"])
def test_resuming_with_another_shard_raises_on_every_rank(ranks4, ranks2, tmp_path, how):
    ranks4(_save_mid_period, str(tmp_path))
    for error, untouched in ranks2(_resume_with_the_wrong_shards, str(tmp_path), how):
        assert error is not None and untouched
        assert ("hold different shards" if how == "shards-forgotten" else "this rank holds") in error, error
        assert "shards=S" in error


def _fsdp1_checkpoint_refused():
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from localsgd_optim import checkpoint

    mesh = _mesh()
    model = FSDP(_module(), device_id=torch.device("cpu"), process_group=mesh.get_group("shard"))
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), k=4, process_group=mesh["replicate"])
    with pytest.raises(TypeError, match="does not support FSDP1 models yet"):
        checkpoint.rank_state(model, opt)
    with pytest.raises(TypeError, match="does not support FSDP1 models yet"):
        checkpoint.get_state_dict(model, opt)
    dist.barrier()
    return True


def test_fsdp1_checkpoint_helpers_refuse_on_every_rank(ranks4):
    assert ranks4(_fsdp1_checkpoint_refused) == [True] * 4


def _replicate_only_refused():
    from torch.distributed._composable.replicate_with_fsdp import replicate

    mesh = _mesh()
    model = _module()
    replicate(model, mesh=mesh["replicate"])  # FSDP2's DDP: gradients all-reduced at every step
    try:
        LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), k=4, process_group=mesh["replicate"])
    except ValueError as e:
        return str(e)
    return None


def test_fsdp2_replication_is_refused_like_hsdp(ranks4):
    for message in ranks4(_replicate_only_refused):
        assert message is not None and "FSDP2 replication" in message and "mesh['shard']" in message, message


TIMED_COST = [1.0, 1.5, 2.0, 2.0]  # seconds per step by rank: replica 0 = ranks 0, 1; replica 1 = ranks 2, 3


def _timed_fsdp2(strategy: str):
    """round_every_s=6 on a 2x2 mesh, each rank with its own clock: rank 1 of replica 0 is due after 4
    steps, rank 0 after 6; the replica rounds when either is due (4), or its ranks would part ways
    in FSDP's collectives. Replica 1 rounds every 3 steps. Three rounds, against the plain loop."""
    from test_timed import _Clock

    mesh = _mesh()
    rank, clock = dist.get_rank(), _Clock()
    periods = [4, 3][rank // 2]
    batches = make_batches(3 * periods)
    model = _fsdp2(mesh)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = LocalSGDOptimizer(inner, round_every_s=6.0, process_group=mesh["replicate"], bucket_cap_mb=0.001,
                            **OPTIONS["overlap" if strategy == "async" else strategy])
    opt._cursor.clock = clock
    opt._cursor.seek(0)
    at_rounds = []
    for x, y in batches:
        opt.zero_grad()
        mse(model(x), y).backward()
        clock.now += TIMED_COST[rank]
        before = opt.num_rounds
        opt.step()
        if opt.num_rounds > before:
            at_rounds.append(opt.num_steps)
    ours = _shards(model)
    ref = _fsdp2(mesh)
    ref_inner = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    params = _locals(ref)
    if strategy == "plain":
        reference_rounds(ref, ref_inner, batches, set(at_rounds), tensors=params, group=mesh.get_group("replicate"))
    elif strategy == "async":  # launched without waiting, landed one step later: as overlap_steps=1 every period
        reference_overlapped(ref, ref_inner, batches, periods, 1, 0.5, diloco(), params=params,
                             group=mesh.get_group("replicate"))
    else:
        reference_diloco(ref, ref_inner, batches, periods, diloco(), params=params, group=mesh.get_group("replicate"))
    return at_rounds, all(torch.equal(a, b) for a, b in zip(ours, _shards(ref)))


@pytest.mark.parametrize("strategy", ["plain", "diloco", "async"])
def test_time_budgeted_sharded_replicas_round_when_any_of_their_ranks_is_due(ranks4, strategy):
    results = ranks4(_timed_fsdp2, strategy)
    assert [r[0] for r in results] == [[4, 8, 12], [4, 8, 12], [3, 6, 9], [3, 6, 9]]
    assert all(same for _, same in results)
