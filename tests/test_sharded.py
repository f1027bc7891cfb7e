"""Sharded parameters (issue 24's first step): refused on every rank, never averaged across shards.

On torch 2.13 an FSDP1 ``FlatParameter``'s ``type(p).__name__`` is ``"Parameter"``, so a name
check let it through and every round averaged rank 0's shard with rank 1's different one.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from localsgd_optim import LocalSGDOptimizer


def _fsdp1(use_orig_params: bool) -> tuple:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    torch.manual_seed(0)
    model = FSDP(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)), device_id=torch.device("cpu"),
                 use_orig_params=use_orig_params)
    params = list(model.parameters())
    shard = [p.detach().clone() for p in params]
    with pytest.raises(TypeError) as info:
        LocalSGDOptimizer(torch.optim.SGD(params, lr=0.1), k=1)
    dist.barrier()
    return type(params[0]).__name__, str(info.value), [p.numel() for p in shard]


@pytest.mark.parametrize("use_orig_params", [False, True], ids=["flat-parameter", "use-orig-params"])
def test_fsdp1_parameters_are_refused_on_every_rank(ranks2, use_orig_params):
    for name, message, _ in ranks2(_fsdp1, use_orig_params):
        assert name == "Parameter" if not use_orig_params else True  # what the old name check saw
        assert "FSDP" in message and "(param group 0, index 0)" in message, message
        assert "use it with DDP or plain modules" in message


# DTensor parameters: tests/test_integrations.py::test_sharded_dtensor_parameters_are_rejected_clearly
