"""Overlapped rounds (launch, then land overlap_steps later): parity, in-flight resume, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from helpers import assert_same, assert_state_equal, make_batches, make_model, mse, params_of, resume_run, train_wrapped
from localsgd_optim import LocalSGDOptimizer, diloco
from reference import reference_overlapped


def _overlap_parity(tau, mix):
    batches = make_batches(14)
    ref = make_model(seed=dist.get_rank())
    reference_overlapped(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2), batches, 4, tau, mix, diloco())
    model = make_model(seed=dist.get_rank())
    opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=4, outer_optimizer=diloco(),
                            overlap_steps=tau, overlap_mix=mix, bucket_cap_mb=0.01)
    train_wrapped(model, opt, batches)
    return params_of(ref), params_of(model)


@pytest.mark.parametrize("tau, mix", [(1, 0.5), (2, 0.0), (3, 0.5)])
def test_overlapped_rounds_match_reference(ranks, tau, mix):
    for ref, got in ranks(_overlap_parity, tau, mix):
        assert_same(got, ref, exact=ranks.world_size == 2)


def _overlap_resume_in_flight():
    def build():
        model = make_model(seed=0)
        return model, LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=4,
                                        outer_optimizer=diloco(), overlap_steps=2)

    # stopped at 9: launched at 8, applied at 10, so in flight at the checkpoint
    uninterrupted, resumed, ckpt = resume_run(build, make_batches(14), 9)
    return uninterrupted, resumed, ckpt["opt"]["local_sgd"]["in_flight"]["apply_at"]


def test_overlapped_round_in_flight_survives_a_checkpoint(ranks):
    for uninterrupted, resumed, apply_at in ranks(_overlap_resume_in_flight):
        assert apply_at == 10
        assert_same(resumed, uninterrupted, exact=True)


def test_overlap_bad_input():
    ps = make_model().parameters
    with pytest.raises(ValueError, match="overlap_steps must be an integer >= 0, got -1"):
        LocalSGDOptimizer(torch.optim.SGD(ps(), lr=0.1), k=4, overlap_steps=-1)
    with pytest.raises(ValueError, match=r"overlap_mix must be a number in \[0, 1\], got 1.5"):
        LocalSGDOptimizer(torch.optim.SGD(ps(), lr=0.1), k=4, overlap_steps=1, overlap_mix=1.5)
    with pytest.raises(ValueError, match=r"overlap_mix=0.25 only applies to overlapped rounds, but overlap_steps=0"):
        LocalSGDOptimizer(torch.optim.SGD(ps(), lr=0.1), k=4, overlap_mix=0.25)  # silently ignored before
    assert LocalSGDOptimizer(torch.optim.SGD(ps(), lr=0.1), k=4, overlap_steps=1).overlap_mix == 0.5
    with pytest.raises(ValueError, match="overlap_steps with compression is not supported yet"):
        LocalSGDOptimizer(torch.optim.SGD(ps(), lr=0.1), k=4, overlap_steps=1, compression="bf16")


# -- bug 1 (found in review): the overlapped launch skipped the compatibility check ----------

def _cast_while_overlapping(when):
    model = make_model(seed=0)
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), k=4, overlap_steps=2,
                            outer_optimizer=diloco())
    batches = make_batches(6)
    cast_after = 0 if when == "before-launch" else 4  # launched at 4, lands at 6
    with pytest.raises(ValueError) as info:
        for step, (x, y) in enumerate(batches, start=1):
            if step == cast_after + 1:
                model.double()
            opt.zero_grad()
            mse(model(x.to(next(model.parameters()).dtype)), y.to(next(model.parameters()).dtype)).backward()
            opt.step()
    outer_state = opt.state_dict()["local_sgd"]["outer"]["optimizer"]["state"]
    return opt.num_steps, str(info.value), outer_state


@pytest.mark.parametrize("when", ["before-launch", "in-flight"])
def test_model_cast_with_overlap_raises_the_clear_error_on_every_rank(ranks, when):
    for num_steps, msg, outer_state in ranks(_cast_while_overlapping, when):
        assert num_steps == (4 if when == "before-launch" else 6)
        assert "is now torch.float64" in msg and "move or cast the model before constructing" in msg
        assert outer_state == {}  # the outer optimizer never stepped


def test_malformed_in_flight_entry_raises_before_anything_changes():
    model = make_model()
    opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=4, overlap_steps=2,
                            outer_optimizer=diloco())
    train_wrapped(model, opt, make_batches(5, rank=0))
    good = opt.state_dict()
    for in_flight, match in [
        ({"apply_at": 6, "mean_delta": [torch.ones(1)]}, r"\['in_flight'\]\['mean_delta'\] must hold one tensor per"),
        ({"apply_at": "6", "mean_delta": []}, r"\['in_flight'\] must be a dict with 'apply_at'"),
        ([1, 2], r"\['in_flight'\] must be a dict with 'apply_at'"),
    ]:
        bad = copy.deepcopy(good)
        bad["param_groups"][0]["lr"] = 0.5
        bad["local_sgd"]["num_steps"] = 1
        bad["local_sgd"]["in_flight"] = in_flight
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(bad)
        assert_state_equal(opt.state_dict(), good)
