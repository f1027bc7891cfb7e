"""opt.stats(): rounds, the payload handed to collectives (counted independently here), time in rounds."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import make_batches, make_model, mse
from localsgd_optim import LocalSGDOptimizer


class Payload(TorchDispatchMode):
    """Bytes handed to data collectives (all-reduce, all-gather inputs) inside the block."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "allreduce_":
            self.bytes += sum(t.numel() * t.element_size() for t in args[0])
        elif name == "_allgather_base_":  # all_gather_into_tensor: args = (output, input, ...)
            if args[1].dtype != torch.int64:  # the control gather (7 int64s a rank) is not payload
                self.bytes += args[1].numel() * args[1].element_size()
        return func(*args, **(kwargs or {}))


def _stats(kwargs):
    model = make_model(seed=dist.get_rank())
    opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=4, bucket_cap_mb=0.01, **kwargs)
    start = opt.stats()
    payload = Payload()
    after_local_step = None
    for step, (x, y) in enumerate(make_batches(8), start=1):
        opt.zero_grad()
        mse(model(x), y).backward()
        with payload:
            opt.step()
        if step == 1:
            after_local_step = opt.stats()
    return start, after_local_step, opt.stats(), payload.bytes, sum(p.numel() * 4 for p in model.parameters())


@pytest.mark.parametrize("kwargs, factor", [({}, 1.0), ({"compression": "bf16"}, 0.5),
                                            ({"average_optimizer_state": True}, 3.0), ({"overlap_steps": 1}, 1.0)],
                         ids=["plain", "bf16", "with-adamw-state", "overlapped"])
def test_stats_count_rounds_bytes_and_time(ranks2, kwargs, factor):
    for start, after_local_step, end, counted, nbytes in ranks2(_stats, kwargs):
        assert start == {"rounds": 0, "bytes_sent": 0, "round_seconds": 0.0}
        assert after_local_step == start  # a step without a round costs nothing
        assert end["rounds"] == 2 and end["round_seconds"] > 0
        assert end["bytes_sent"] == counted == 2 * factor * nbytes


def test_int8_counts_codes_and_scales(ranks2):
    for _, _, end, counted, nbytes in ranks2(_stats, {"compression": "int8"}):
        assert end["bytes_sent"] == counted
        assert nbytes / 4 * 2 < counted < nbytes / 4 * 2 * 1.1  # 1 byte per element, plus the scales


def test_single_process_has_no_rounds():
    model = make_model()
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), k=2)
    for x, y in make_batches(4, rank=0):
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()
    assert opt.stats() == {"rounds": 0, "bytes_sent": 0, "round_seconds": 0.0}
