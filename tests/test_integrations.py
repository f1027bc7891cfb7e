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


def _dtensor_parameters_rejected():
    import pytest
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    weight = torch.nn.Parameter(distribute_tensor(torch.ones(4, 4), mesh, [Shard(0)]))
    with pytest.raises(TypeError, match="is a DTensor: FSDP2, DTensor and tensor-parallel parameters are sharded"):
        LocalSGDOptimizer(torch.optim.SGD([weight], lr=0.1), k=4)
    dist.barrier()
    return True


def test_sharded_dtensor_parameters_are_rejected_clearly(ranks2):
    assert ranks2(_dtensor_parameters_rejected) == [True, True]
