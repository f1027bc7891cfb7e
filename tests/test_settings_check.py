"""The cross-rank settings check compares exact values, not rounded ones.

``topk(0.1, chunk=10)`` and ``topk(0.1000001, chunk=10)`` both print ``topk(0.1, ...)`` with
``:g``, yet send 1 and 2 values per chunk: compared as printed, ranks agreed, then one rank
indexed past its peers' payloads and the other's gloo all-gather aborted on the size. Settings
that differ only past the sixth digit (or past a tensor ``repr``'s fourth decimal) must raise on
every rank, naming both exact values; settings that are equal (or the same compressor spelled
two ways) must still pass and average.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from helpers import make_batches, make_model, params_of, train_wrapped
from localsgd_optim import LayoutMismatchError, LocalSGDOptimizer, quantize, topk


def _tensor_lr(lr: float):
    return lambda params: torch.optim.SGD(params, lr=torch.tensor(lr), momentum=0.9, nesterov=True)


#: case -> (kwargs of every rank but the last, kwargs of the last rank, words every message names)
DISAGREE = {
    "topk-fraction": (
        {"compression": topk(0.1, bits=2, chunk=10)},
        {"compression": topk(0.1000001, bits=2, chunk=10)},
        ["ranks disagree on compression", "'topk(0.1, bits=2, chunk=10): 1 value per chunk of 10'",
         "'topk(0.1000001, bits=2, chunk=10): 2 values per chunk of 10'", "Pass the same compression on every rank"],
    ),
    "topk-feedback": (
        {"compression": topk(0.05, bits=2, chunk=64, feedback=0.9)},
        {"compression": topk(0.05, bits=2, chunk=64, feedback=0.9000001)},
        ["ranks disagree on compression", "feedback=0.9)", "feedback=0.9000001)"],
    ),
    "quantize-feedback": (
        {"compression": quantize(4, chunk=256, feedback=0.5)},
        {"compression": quantize(4, chunk=256, feedback=0.50000001)},
        ["ranks disagree on compression", "feedback=0.5)", "feedback=0.50000001)"],
    ),
    "outer-tensor-lr": (
        {"outer_optimizer": _tensor_lr(0.7)},
        {"outer_optimizer": _tensor_lr(0.70001)},
        ["ranks disagree on outer_optimizer", "lr=tensor(0.699999988079071)", "lr=tensor(0.7000100016593933)"],
    ),
    "overlap-mix": (
        {"outer_optimizer": _tensor_lr(0.7), "overlap_steps": 1, "overlap_mix": 0.5},
        {"outer_optimizer": _tensor_lr(0.7), "overlap_steps": 1, "overlap_mix": 0.5000001},
        ["ranks disagree on overlap", "[1, 0.5]", "[1, 0.5000001]"],
    ),
    "bucket-cap": (
        {"bucket_cap_mb": 0.01},
        {"bucket_cap_mb": 0.0100000001},
        ["ranks disagree on bucket_cap_mb", "0.01,", "0.0100000001"],
    ),
}


def _disagree(case: str):
    mine, last, _ = DISAGREE[case]
    kwargs = last if dist.get_rank() == dist.get_world_size() - 1 else mine
    model = make_model(seed=0)
    error = None
    try:
        opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), k=2, **kwargs)
        train_wrapped(model, opt, make_batches(4))  # (old code: the first round crashed or aborted here)
    except Exception as e:  # noqa: BLE001 - the test inspects what every rank raised
        error = e
    dist.barrier()  # the group is still usable: nobody is stuck in a collective
    return type(error).__name__, str(error)


@pytest.mark.parametrize("case", list(DISAGREE))
def test_settings_differing_past_the_printed_digits_raise_on_every_rank(ranks, case):
    results = ranks(_disagree, case)
    assert len({message for _, message in results}) == 1, results  # the same verdict everywhere
    for name, message in results:
        assert name == LayoutMismatchError.__name__, message
        for word in DISAGREE[case][2]:
            assert word in message, message
        assert f"rank {ranks.world_size - 1} has" in message, message


#: case -> (kwargs of even ranks, kwargs of odd ranks): equal settings, or the same ones spelled twice
AGREE = {
    "topk": ({"compression": topk(0.1, bits=2, chunk=10)}, {"compression": topk(0.1, bits=2, chunk=10)}),
    "int4-or-quantize4": ({"compression": "int4"}, {"compression": quantize(4)}),
    "outer-tensor-lr": ({"outer_optimizer": _tensor_lr(0.7)}, {"outer_optimizer": _tensor_lr(0.7)}),
}


def _agree(case: str):
    kwargs = AGREE[case][dist.get_rank() % 2]
    model = make_model(seed=0)
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), k=2, **kwargs)
    train_wrapped(model, opt, make_batches(4))  # two rounds, at steps 2 and 4
    return params_of(model), opt.stats()["rounds"]


@pytest.mark.parametrize("case", list(AGREE))
def test_equal_settings_still_pass_and_average(ranks, case):
    results = ranks(_agree, case)
    for params, rounds in results:
        assert rounds == 2
        for got, first in zip(params, results[0][0], strict=True):
            torch.testing.assert_close(got, first, rtol=0, atol=0)  # every replica ends identical
