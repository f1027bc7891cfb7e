"""Fitting where users are (issue 8, first piece): torch.compile."""

from __future__ import annotations

import torch
import torch.distributed as dist

from helpers import make_batches, make_model, mse, params_of
from localsgd_optim import LocalSGDOptimizer
from helpers import assert_same


def _compiled_training():
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    def train(compile_it):
        model = make_model(seed=dist.get_rank())
        fwd = torch.compile(model, backend="aot_eager") if compile_it else model
        opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=2)
        for x, y in make_batches(8):  # 4 averaging rounds
            opt.zero_grad()
            mse(fwd(x), y).backward()
            opt.step()
        return params_of(model)

    dynamo.reset()
    counters.clear()
    compiled = train(True)
    stats = dict(counters["stats"])
    recompiles = sum(counters["recompiles"].values()) if "recompiles" in counters else 0
    return compiled, train(False), stats, recompiles


def test_compiled_model_trains_without_recompiles(ranks2):
    # Averaging copies into the parameters in place: same storage, shape, dtype and strides,
    # so dynamo's guards hold and the graph compiled at step 1 serves every step after a round.
    for compiled, eager, stats, recompiles in ranks2(_compiled_training):
        assert stats.get("unique_graphs") == 1 and recompiles == 0, stats
        assert_same(compiled, eager, exact=False)


def _dtensor_sharded_over_the_group_rejected():
    import pytest
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    weight = torch.nn.Parameter(distribute_tensor(torch.ones(4, 4), mesh, [Shard(0)]))
    # sharded over the very ranks averaged: refused (the ranks hold different rows)
    with pytest.raises(ValueError, match=r"index 0\): it is Shard\(dim=0\) over mesh dimension 0"):
        LocalSGDOptimizer(torch.optim.SGD([weight], lr=0.1), k=4)
    # replicated over them: averaged like a plain tensor
    local = torch.full((4,), float(dist.get_rank()))  # (from_local: each rank's own value, not broadcast)
    bias = torch.nn.Parameter(DTensor.from_local(local, mesh, [Replicate()], run_check=False))
    opt = LocalSGDOptimizer(torch.optim.SGD([bias], lr=0.0), k=1, sync_on_init=False)
    opt.step()
    dist.barrier()
    return bias.to_local().tolist()


def test_dtensor_sharded_over_the_averaged_ranks_is_refused(ranks2):
    assert ranks2(_dtensor_sharded_over_the_group_rejected) == [[0.5] * 4] * 2
