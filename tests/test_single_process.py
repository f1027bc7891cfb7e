"""Single-process behaviour: the Optimizer contract, input validation, checkpoints, pass-through."""

from __future__ import annotations

import doctest
import io
import warnings

import pytest
import torch
from torch import nn

import localsgd_optim
from helpers import make_batches, make_model, mse, params_of, train_wrapped
from localsgd_optim import LocalSGDOptimizer, no_sync
from localsgd_optim._buckets import first_nonfinite


def wrap(model, k=4, **kw):
    return LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), k=k, **kw)


# -- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [0, -3, 2.5, "8", True])  # (None: the default, 8)
def test_bad_k_names_argument_and_value(k):
    with pytest.raises(ValueError, match=rf"k must be an integer >= 1.*got {k!r}"):
        wrap(nn.Linear(2, 2), k=k)


@pytest.mark.parametrize("cap", [0, -1.0, float("nan"), float("inf"), "25", True])
def test_bad_bucket_cap(cap):
    with pytest.raises(ValueError, match=r"bucket_cap_mb must be a finite number > 0.*got"):
        wrap(nn.Linear(2, 2), bucket_cap_mb=cap)


def test_bad_optimizer():
    model = nn.Linear(2, 2)
    with pytest.raises(TypeError, match=r"optimizer must be a torch.optim.Optimizer instance.*got generator"):
        LocalSGDOptimizer(model.parameters(), k=4)
    with pytest.raises(TypeError, match="already a LocalSGDOptimizer"):
        LocalSGDOptimizer(wrap(model), k=4)


def test_k1_warns():
    with pytest.warns(UserWarning, match="k=1 averages parameters after every step"):
        wrap(nn.Linear(2, 2), k=1)


def test_no_sync_rejects_non_module_and_is_noop_on_plain_module():
    with pytest.raises(TypeError, match="module must be a torch.nn.Module, got list"):
        with no_sync([1]):
            pass
    model = make_model()
    x, y = make_batches(1, rank=0)[0]
    with no_sync(model):
        mse(model(x), y).backward()
    assert all(p.grad is not None for p in model.parameters())


# -- the Optimizer contract -----------------------------------------------------------------

def test_is_a_real_optimizer_sharing_groups_state_defaults():
    model = make_model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = LocalSGDOptimizer(inner, k=4)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    assert opt.defaults is inner.defaults
    opt.param_groups[0]["lr"] = 0.5  # set through the wrapper ...
    assert inner.param_groups[0]["lr"] == 0.5  # ... is what the inner step uses
    assert opt.k == 4 and opt.num_steps == 0
    assert "LocalSGDOptimizer(k=4, warmup_steps=0, num_steps=0" in repr(opt) and "AdamW" in repr(opt)


def test_pass_through_equals_inner_optimizer_in_single_process():
    batches = make_batches(9, rank=0)
    a, b = make_model(), make_model()
    train_wrapped(a, torch.optim.AdamW(a.parameters(), lr=1e-2), batches)
    opt = LocalSGDOptimizer(torch.optim.AdamW(b.parameters(), lr=1e-2), k=2)
    train_wrapped(b, opt, batches)
    for x, y in zip(params_of(a), params_of(b)):
        assert torch.equal(x, y)
    assert opt.num_steps == 9
    opt.sync()  # no process group: a no-op, no error


SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.2, total_steps=10),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (1 + s)),
    "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0, factor=0.5),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_lr_schedulers_drive_the_inner_optimizer(name):
    batches = make_batches(8, rank=0)

    def run(make_opt):
        model = make_model()
        opt = make_opt(model)
        sched = SCHEDULERS[name](opt)
        lrs = []
        for x, y in batches:
            opt.zero_grad()
            loss = mse(model(x), y)
            loss.backward()
            opt.step()
            sched.step(1.0) if name == "ReduceLROnPlateau" else sched.step()
            lrs.append(opt.param_groups[0]["lr"])
        return lrs, params_of(model), opt

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        ref_lrs, ref_params, _ = run(lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9))
        lrs, params, opt = run(lambda m: wrap(m))
    assert lrs == ref_lrs and len(set(lrs)) > 1
    assert opt.optimizer.param_groups[0]["lr"] == lrs[-1]
    for x, y in zip(params, ref_params):
        assert torch.equal(x, y)


def test_closure_loss_is_returned_and_lbfgs_works():
    x, y = make_batches(1, rank=0)[0]

    def run(make_opt):
        model = make_model()
        opt = make_opt(model)
        losses = []
        for _ in range(3):
            def closure():
                opt.zero_grad()
                loss = mse(model(x), y)
                loss.backward()
                return loss
            losses.append(opt.step(closure).item())
        return losses, params_of(model)

    ref = run(lambda m: torch.optim.LBFGS(m.parameters(), lr=0.5, max_iter=4))
    ours = run(lambda m: LocalSGDOptimizer(torch.optim.LBFGS(m.parameters(), lr=0.5, max_iter=4), k=2))
    assert ours[0] == ref[0] and ours[0][-1] < ours[0][0]
    for a, b in zip(ours[1], ref[1]):
        assert torch.equal(a, b)


def test_hooks_on_wrapper_and_inner_both_run_once_per_step():
    model = make_model()
    opt = wrap(model)
    seen = []
    opt.register_step_pre_hook(lambda o, a, kw: seen.append(("pre", o is opt)))
    opt.register_step_post_hook(lambda o, a, kw: seen.append(("post", o.num_steps)))
    opt.optimizer.register_step_post_hook(lambda o, a, kw: seen.append(("inner", o is opt.optimizer)))
    train_wrapped(model, opt, make_batches(2, rank=0))
    assert seen == [("pre", True), ("inner", True), ("post", 1), ("pre", True), ("inner", True), ("post", 2)]


def test_state_dict_hooks_run():
    opt = wrap(make_model())
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    loaded = []
    opt.register_load_state_dict_post_hook(lambda o: loaded.append(o.num_steps))
    sd = opt.state_dict()
    assert sd["extra"] == 1
    sd.pop("extra")
    opt.load_state_dict(sd)
    assert loaded == [0]


def test_zero_grad_set_to_none():
    model = make_model()
    opt = wrap(model)
    train_wrapped(model, opt, make_batches(1, rank=0))
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_add_param_group_single_process():
    model = make_model()
    opt = wrap(model)
    extra = nn.Parameter(torch.ones(3))
    opt.add_param_group({"params": [extra], "lr": 0.5})
    assert len(opt.param_groups) == 2 and opt.param_groups is opt.optimizer.param_groups
    assert opt.param_groups[1]["momentum"] == 0.9  # defaults filled in by the inner optimizer


# -- checkpoints ----------------------------------------------------------------------------

def test_state_dict_round_trip_weights_only():
    model = make_model()
    opt = wrap(model, k=4)
    train_wrapped(model, opt, make_batches(6, rank=0))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert sd["local_sgd"] == {"version": 1, "num_steps": 6, "k": 4, "warmup_steps": 0}
    fresh = wrap(make_model(), k=4)
    fresh.load_state_dict(sd)
    assert fresh.num_steps == 6
    assert fresh.state is fresh.optimizer.state and len(fresh.state) == len(opt.state)
    assert "local_sgd" in sd  # loading does not mutate the caller's dict


def test_plain_optimizer_state_dict_loads_with_warning():
    model = make_model()
    plain = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_wrapped(model, plain, make_batches(3, rank=0))
    opt = wrap(model)
    with pytest.warns(UserWarning, match="no 'local_sgd' entry.*starting the Local SGD step count at 0"):
        opt.load_state_dict(plain.state_dict())
    assert opt.num_steps == 0
    assert torch.equal(opt.state[next(model.parameters())]["momentum_buffer"],
                       plain.state[next(model.parameters())]["momentum_buffer"])


@pytest.mark.parametrize(
    "entry, match",
    [
        ({"version": 2, "num_steps": 3}, "has version 2, but this localsgd_optim reads version 1"),
        ({"num_steps": 3}, "must be a dict with a 'version' key"),
        ([1, 2], "must be a dict with a 'version' key"),
        ({"version": 1, "num_steps": -1}, r"\['num_steps'\] must be an integer >= 0, got -1"),
        ({"version": 1, "num_steps": "7"}, r"\['num_steps'\] must be an integer >= 0, got '7'"),
    ],
)
def test_malformed_entry_raises_and_changes_nothing(entry, match):
    model = make_model()
    opt = wrap(model)
    train_wrapped(model, opt, make_batches(2, rank=0))
    sd = opt.state_dict()
    sd["local_sgd"] = entry
    sd["param_groups"][0]["lr"] = 123.0
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert opt.num_steps == 2 and opt.param_groups[0]["lr"] == 0.1


# -- GradScaler -----------------------------------------------------------------------------

def test_grad_scaler_skipped_step_still_counts_and_normal_steps_match():
    batches = make_batches(5, rank=0)

    def run(opt_factory, poison_step):
        model = make_model()
        opt = opt_factory(model)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        for i, (x, y) in enumerate(batches):
            opt.zero_grad()
            loss = mse(model(x), y)
            if i == poison_step:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        return params_of(model), opt, scaler.get_scale()

    ref_params, _, ref_scale = run(lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), 2)
    params, opt, scale = run(wrap, 2)
    for a, b in zip(params, ref_params):
        assert torch.equal(a, b)
    assert scale == ref_scale == 2.0**9  # one backoff for the one inf step
    assert opt.num_steps == 5  # the skipped step counted: ranks stay in phase


# -- docs -----------------------------------------------------------------------------------

@pytest.mark.parametrize("module", ["localsgd_optim.optimizer", "localsgd_optim.ddp"])
def test_docstring_examples_run(module):
    import importlib

    mod = importlib.import_module(module)
    result = doctest.testmod(mod, extraglobs={"torch": torch}, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_public_names():
    assert set(localsgd_optim.__all__) >= {"LocalSGDOptimizer", "no_sync"}


def test_loading_a_checkpoint_saved_with_another_k_warns():
    opt = wrap(make_model(), k=5)
    sd = opt.state_dict()
    other = wrap(make_model(), k=2)
    with pytest.warns(UserWarning, match="saved with k=5; this optimizer has k=2"):
        other.load_state_dict(sd)


def test_grad_scaler_with_fused_inner_optimizer_matches_plain():
    # fused AdamW handles grad_scale/found_inf itself: the wrapper hands them through
    batches = make_batches(4, rank=0)

    def run(factory):
        model = make_model()
        opt = factory(model)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        for i, (x, y) in enumerate(batches):
            opt.zero_grad()
            loss = mse(model(x), y) * (float("inf") if i == 1 else 1.0)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        return params_of(model), opt

    ref, _ = run(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True))
    got, opt = run(lambda m: LocalSGDOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True), k=2))
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    assert opt.num_steps == 4


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_detector_finds_nan_and_both_infinities(bad):
    params = [torch.ones(3), torch.ones(2, dtype=torch.bfloat16), torch.ones(4), torch.ones(5, dtype=torch.bfloat16)]
    assert first_nonfinite(params) == -1
    params[3][1] = bad
    assert first_nonfinite(params) == 3
    params[2][0] = bad
    assert first_nonfinite(params) == 2  # the first one, across dtype groups


def test_nonfinite_detector_has_no_false_positive_on_large_fp16_sums():
    # an fp16 sum overflows at 65504: healthy half-precision models must not be flagged
    params = [torch.ones(70000, dtype=torch.float16), torch.full((512, 512), 0.5, dtype=torch.float16)]
    assert first_nonfinite(params) == -1
