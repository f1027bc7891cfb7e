"""FSDP2: a plain parameter FSDP2 does not manage is refused at binding, on every rank.

Four real gloo ranks form a (replicate=2, shard=2) mesh, as in ``test_sharded.py``. A parameter
registered after ``fully_shard`` (or taken from a module outside it) stays a plain tensor: FSDP2
neither gathers nor reduce-scatters it, so each shard rank trains its own copy, and a round over
``mesh['replicate']`` only averages each copy with its twin in the other replica. Before, the
copies then differed within a replica for good, silently; now binding raises a ``ValueError``
naming the parameter and the fix, on every rank, before anything moves.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from helpers import make_batches, train_wrapped
from localsgd_optim import LocalSGDError, LocalSGDOptimizer
from test_sharded import _fsdp2, _mesh, _shards

FIX = ["Register it before fully_shard", "fully_shard(module, mesh=mesh['shard'])", "leave it out of the optimizer",
       "over 2 ranks per replica"]


def _late_parameter(case: str):
    mesh = _mesh()
    model = _fsdp2(mesh)
    params = list(model.parameters())
    if case == "one-rank-only" and dist.get_rank() != 3:
        pass  # only global rank 3 (replica 1, shard 1) registers it: its replicate group is {1, 3}
    elif case in ("late-registered", "one-rank-only"):
        model[2].register_parameter("extra", nn.Parameter(torch.ones(3)))  # equal on every rank, still refused
        params = list(model.parameters())
    elif case == "outside-module":
        params.append(nn.Linear(4, 2).weight)  # a module FSDP2 never saw: averaged across replicas only
    before = _shards(model)
    error = None
    try:
        opt = LocalSGDOptimizer(torch.optim.SGD(params, lr=0.05), k=2, process_group=mesh["replicate"])
        if case == "add-param-group":  # refused at the next round's control collective, on every rank
            opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, 2))]})
            train_wrapped(model, opt, make_batches(2))
    except Exception as e:  # noqa: BLE001 - the test inspects what every rank raised
        error = e
    dist.barrier()  # the group is still usable: nobody is stuck in a collective
    untouched = all(torch.equal(a, b) for a, b in zip(before, _shards(model))) if case != "add-param-group" else None
    return type(error).__name__, str(error), untouched


@pytest.mark.parametrize("case,words", [
    ("late-registered", ["parameter '2.extra' (param group 0, index 4), float32[3]"]),
    ("outside-module", ["parameter (param group 0, index 6), float32[2, 4]"]),
    ("add-param-group", ["parameter (param group 1, index 0), float32[2, 2]"]),
])
def test_plain_parameter_next_to_fsdp2_is_refused_on_every_rank(ranks4, case, words):
    for name, message, untouched in ranks4(_late_parameter, case):
        assert name == "ValueError", message
        for word in words + FIX:
            assert word in message, message
        assert untouched in (True, None), "no shard changed"


def test_plain_parameter_on_one_rank_only_raises_in_its_replicate_group(ranks4):
    results = ranks4(_late_parameter, "one-rank-only")
    # Ranks 0 and 2 average together and agree; rank 3 raises its own error, and its peer, rank 1, is
    # told which rank failed instead of waiting for it in a collective.
    assert [r[0] for r in results] == ["NoneType", LocalSGDError.__name__, "NoneType", "ValueError"], results
    assert "rank(s) [1] failed while preparing binding to the process group" in results[1][1], results[1][1]
    assert "parameter '2.extra' (param group 0, index 4), float32[3]" in results[3][1], results[3][1]
