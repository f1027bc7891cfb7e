"""torch.distributed.checkpoint: a Local SGD run saved mid-period resumes bit for bit."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from helpers import make_batches, make_model, params_of, train_wrapped
from localsgd_optim import LocalSGDOptimizer, checkpoint, diloco


def _build():
    model = make_model(seed=0)
    opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=4, outer_optimizer=diloco())
    return model, opt


def _dcp_resume(path):
    batches = make_batches(14)
    model, opt = _build()
    train_wrapped(model, opt, batches)
    uninterrupted = params_of(model)

    model, opt = _build()
    train_wrapped(model, opt, batches[:10])  # step 10: mid-period for k=4, replicas differ
    at_save = params_of(model)
    dcp.save({"train": checkpoint.get_state_dict(model, opt)}, checkpoint_id=path)

    model, opt = _build()  # fresh objects: what a restarted job has
    state = {"train": checkpoint.get_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete checkpoint loads without warnings
        checkpoint.set_state_dict(model, opt, state["train"])
    loaded = params_of(model), opt.num_steps
    train_wrapped(model, opt, batches[10:])
    return uninterrupted, params_of(model), at_save, loaded


def test_dcp_resume_mid_period_is_bit_exact(ranks, tmp_path):
    results = ranks(_dcp_resume, str(tmp_path / "ckpt"))
    for uninterrupted, resumed, at_save, (loaded, num_steps) in results:
        assert num_steps == 10
        for a, b in zip(loaded, at_save):  # each rank got its own weights back, not rank 0's
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for a, b in zip(resumed, uninterrupted):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(results[0][2][0], results[1][2][0]), "step 10 should be mid-period"


def _wrong_world_size(path):
    model, opt = _build()
    train_wrapped(model, opt, make_batches(2))
    dcp.save({"train": checkpoint.get_state_dict(model, opt)}, checkpoint_id=path)
    state = {"train": checkpoint.get_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=path)
    state["train"]["world_size"] = dist.get_world_size() + 1  # as if saved by a bigger job
    with pytest.raises(ValueError) as err:
        checkpoint.set_state_dict(model, opt, state["train"])
    return str(err.value)


def test_dcp_world_size_mismatch_raises_on_every_rank(ranks2, tmp_path):
    for msg in ranks2(_wrong_world_size, str(tmp_path / "ckpt")):
        assert "saved by 3 ranks, this run has 2" in msg and "same world size" in msg


def _torch_helpers_drop_the_entry():
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model, opt = _build()
    train_wrapped(model, opt, make_batches(3))
    osd = get_optimizer_state_dict(model, opt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        set_optimizer_state_dict(model, opt, osd)
    return "local_sgd" in osd, [str(w.message) for w in caught]


def test_torch_dcp_helpers_alone_lose_the_entry_and_say_so(ranks2):
    # Why localsgd_optim.checkpoint exists: DCP's helper keeps only "state" and "param_groups".
    for has_entry, messages in ranks2(_torch_helpers_drop_the_entry):
        assert not has_entry
        assert any("use localsgd_optim.checkpoint" in m for m in messages)
