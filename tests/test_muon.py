"""Muon as the inner optimizer (issue 26's first step): it takes 2-D parameters only, so the rest
go to AdamW, each in its own LocalSGDOptimizer with the same ``k``. Both average at the same steps
(parity with a one-parameter-at-a-time loop) and resume bit for bit from a mid-period checkpoint."""

from __future__ import annotations

import io

import pytest

import torch
import torch.distributed as dist

from helpers import make_batches, make_model, mse, params_of
from localsgd_optim import LocalSGDOptimizer
from reference import average_one_by_one, broadcast_one_by_one


def _inner(model):
    matrices = [p for p in model.parameters() if p.ndim == 2]
    rest = [p for p in model.parameters() if p.ndim != 2]
    return torch.optim.Muon(matrices, lr=0.02), torch.optim.AdamW(rest, lr=1e-2)


def _build():
    model = make_model(seed=0)
    return model, [LocalSGDOptimizer(inner, k=4) for inner in _inner(model)]


def _train(model, opts, batches):
    for x, y in batches:
        for opt in opts:
            opt.zero_grad()
        mse(model(x), y).backward()
        for opt in opts:
            opt.step()


def _muon_parity_and_resume():
    batches = make_batches(10)
    ref = make_model(seed=0)
    inners = _inner(ref)
    broadcast_one_by_one(list(ref.parameters()))
    for step, (x, y) in enumerate(batches, start=1):
        for inner in inners:
            inner.zero_grad()
        mse(ref(x), y).backward()
        for inner in inners:
            inner.step()
        if step % 4 == 0:
            average_one_by_one(list(ref.parameters()))

    model, opts = _build()
    _train(model, opts, batches)
    uninterrupted = params_of(model)

    model, opts = _build()
    _train(model, opts, batches[:6])  # mid-period: the replicas differ
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opts": [o.state_dict() for o in opts]}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model, opts = _build()
    model.load_state_dict(saved["model"])
    for opt, state in zip(opts, saved["opts"]):
        opt.load_state_dict(state)
    _train(model, opts, batches[6:])
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, [p.sum().item() for p in params_of(model)])
    return params_of(ref), uninterrupted, params_of(model), opts[0].num_steps, everyone


def test_muon_inner_optimizer_averages_and_resumes_exactly(ranks2):
    for ref, uninterrupted, resumed, num_steps, everyone in ranks2(_muon_parity_and_resume):
        assert num_steps == 10
        for a, b in zip(uninterrupted, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for a, b in zip(resumed, uninterrupted, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert everyone[0] != everyone[1], "steps 9 and 10 are local: the replicas differ"


def _combined_equals_two_wrappers():
    from localsgd_optim import Combined, topk

    batches = make_batches(10)
    model, opts = _build()
    _train(model, opts, batches)
    two_wrappers = params_of(model)

    def build():
        model = make_model(seed=0)
        return model, LocalSGDOptimizer(Combined(*_inner(model)), k=4)

    model, opt = build()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)  # a scheduler drives both parts
    _train(model, [opt], batches)
    sched.step()
    one_wrapper = params_of(model)
    # resumed mid-period with compression: the Combined state dict round-trips through torch.save
    model, opt = build()
    opt = LocalSGDOptimizer(Combined(*_inner(model)), k=4, compression=topk(0.05, bits=2, chunk=64))
    _train(model, [opt], batches[:6])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    _train(model, [opt], batches[6:])
    uninterrupted = params_of(model)
    model = make_model(seed=0)
    opt = LocalSGDOptimizer(Combined(*_inner(model)), k=4, compression=topk(0.05, bits=2, chunk=64))
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    _train(model, [opt], batches[6:])
    parts = len({g["combined_part"] for g in saved["opt"]["param_groups"]})
    return two_wrappers, one_wrapper, uninterrupted, params_of(model), parts


def test_combined_muon_adamw_is_one_optimizer(ranks2):
    for two, one, uninterrupted, resumed, parts in ranks2(_combined_equals_two_wrappers):
        assert parts == 2
        for a, b in zip(one, two, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)  # one round over both = two rounds
        for a, b in zip(resumed, uninterrupted, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_combined_refuses_shared_parameters_and_foreign_state():
    from localsgd_optim import Combined

    model = make_model()
    params = list(model.parameters())
    with pytest.raises(ValueError, match=r"Combined: a parameter of shape \(64, 16\) is in optimizers 0 and 1"):
        Combined(torch.optim.SGD(params[:2], lr=0.1), torch.optim.SGD(params[:1], lr=0.1))
    with pytest.raises(TypeError, match="argument 1 must be a torch.optim.Optimizer"):
        Combined(torch.optim.SGD(params, lr=0.1), "adamw")
    opt = Combined(*_inner(model))
    with pytest.raises(ValueError, match=r"expected \{'combined': \[one state dict per optimizer \(2\)\]\}"):
        opt.load_state_dict(torch.optim.SGD(params, lr=0.1).state_dict())
