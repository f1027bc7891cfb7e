"""The int8 reducer (error feedback, all-gathers): parity with the reference loop, resume, layouts."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from helpers import assert_same, make_batches, make_model, params_of, resume_run, train_wrapped
from localsgd_optim import LocalSGDOptimizer, diloco
from reference import reference_int8_diloco


def _int8_parity():
    batches = make_batches(12)
    ref = make_model(seed=dist.get_rank())
    reference_int8_diloco(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2), batches, 4, diloco())
    model = make_model(seed=dist.get_rank())
    opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=4, compression="int8",
                            outer_optimizer=diloco(), bucket_cap_mb=0.01)
    train_wrapped(model, opt, batches)
    return params_of(ref), params_of(model), sum(r.abs().sum().item() for r in opt.state_dict()["local_sgd"]["int8_residuals"])


def test_int8_with_error_feedback_matches_reference_exactly(ranks):
    results = ranks(_int8_parity)
    for ref, got, residual_mass in results:
        # gathered, then summed in rank order: bit for bit on any world size
        assert_same(got, ref, exact=True)
        assert residual_mass > 0  # error feedback is carrying something
    for _, got, _ in results[1:]:
        assert_same(got, results[0][1], exact=True)


def _int8_resume():
    def build():
        model = make_model(seed=0)
        return model, LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=4, compression="int8")

    # stopped at 6, after one round: the residuals are non-zero
    uninterrupted, resumed, _ = resume_run(build, make_batches(14), 6)
    return uninterrupted, resumed


def test_int8_resume_carries_residuals(ranks):
    for uninterrupted, resumed in ranks(_int8_resume):
        assert_same(resumed, uninterrupted, exact=True)


def _channels_last_int8():
    torch.manual_seed(dist.get_rank())
    conv = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    opt = LocalSGDOptimizer(torch.optim.SGD(conv.parameters(), lr=0.1), k=[(None, 1)],
                            compression="int8")
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(dist.get_rank()))
    conv(x).sum().backward()
    opt.step()
    return params_of(conv)


def test_int8_with_channels_last_parameters(ranks):
    results = ranks(_channels_last_int8)
    for got in results[1:]:
        assert_same(got, results[0], exact=True)  # one round: replicas identical
    assert all(torch.isfinite(p).all() for p in results[0])
