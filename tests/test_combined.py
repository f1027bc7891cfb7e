"""``Combined``: LR schedulers reach the parts after a load or an added group, DCP and the
checkpoint helpers take its state dict, and ``defaults`` let momentum-cycling schedulers drive
SGD's ``momentum`` and AdamW's ``betas`` together."""

from __future__ import annotations

import copy
import doctest
import io

import pytest
import torch
import torch.distributed as dist
from torch import nn

from helpers import make_batches, make_model, mse, params_of, train_wrapped
from localsgd_optim import Combined, LocalSGDOptimizer
from reference import average_one_by_one, broadcast_one_by_one


def _split(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    matrices = [p for p in model.parameters() if p.ndim == 2]
    return matrices, [p for p in model.parameters() if p.ndim != 2]


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _part_lrs(opt: LocalSGDOptimizer) -> list[float]:
    return [g["lr"] for part in opt.optimizer.optimizers for g in part.param_groups]


# -- 1. param_groups: a live view of the parts' groups -----------------------------------------

def _step_lr_build():
    model = make_model(seed=0)
    matrices, rest = _split(model)
    opt = LocalSGDOptimizer(Combined(torch.optim.SGD(matrices, lr=0.05), torch.optim.AdamW(rest, lr=0.05)), k=4)
    return model, opt, torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)


def _step_lr_train(model, opt, sched, batches):
    for x, y in batches:
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()
        sched.step()


def test_scheduler_reaches_the_parts_after_load_state_dict():
    batches = make_batches(4, rank=0)
    model, opt, sched = _step_lr_build()
    _step_lr_train(model, opt, sched, batches)
    uninterrupted = params_of(model)

    model, opt, sched = _step_lr_build()
    _step_lr_train(model, opt, sched, batches[:2])
    saved = _roundtrip({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    model, opt, sched = _step_lr_build()  # as examples/train_charlm.py resumes
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    sched.load_state_dict(saved["sched"])
    assert _part_lrs(opt) == [0.0125, 0.0125]
    _step_lr_train(model, opt, sched, batches[2:3])
    assert sched.get_last_lr() == [0.00625, 0.00625]
    assert _part_lrs(opt) == [0.00625, 0.00625], "the scheduler's lr must be the lr the parts train at"
    # the wrapper, the Combined and the parts hold the same group dicts
    assert [id(g) for g in opt.param_groups] == [id(g) for p in opt.optimizer.optimizers for g in p.param_groups]
    _step_lr_train(model, opt, sched, batches[3:])
    for a, b in zip(params_of(model), uninterrupted, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_group_added_to_a_part_is_a_group_of_the_combined():
    model = make_model(seed=0)
    w0, b0, w1, b1, w2, b2 = model.parameters()
    sgd, adamw = torch.optim.SGD([w0, w1, w2], lr=0.05), torch.optim.AdamW([b0], lr=0.01)
    combined = Combined(sgd, adamw)
    adamw.add_param_group({"params": [b1], "lr": 0.02})  # to the part, after Combined was built
    opt = LocalSGDOptimizer(combined, k=4)
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.01, 0.02]
    opt.add_param_group({"params": [b2], "lr": 0.03, "combined_part": 1})  # through the wrapper
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.01, 0.02, 0.03]
    assert [len(g["params"]) for g in adamw.param_groups] == [1, 1, 1]
    assert Combined.PART_KEY not in adamw.param_groups[-1]
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
    opt.step()  # (no gradients: nothing moves)
    sched.step()
    assert [g["lr"] for p in (sgd, adamw) for g in p.param_groups] == [0.025, 0.005, 0.01, 0.015]


def test_add_param_group_names_the_part_and_refuses_a_parameter_of_another():
    model = make_model(seed=0)
    w0, b0, w1, b1, _, _ = model.parameters()
    opt = Combined(torch.optim.SGD([w0], lr=0.1), torch.optim.AdamW([b0], lr=0.01))
    with pytest.raises(ValueError, match=r"param_group\['combined_part'\] must be the index .* in \[0, 2\), got None"):
        opt.add_param_group({"params": [w1]})
    with pytest.raises(ValueError, match=r"got 2; e.g. \{'params': \[...\], 'combined_part': 1\} for AdamW"):
        opt.add_param_group({"params": [w1], "combined_part": 2})
    with pytest.raises(ValueError, match=r"\(64, 16\) is already in optimizer 0, and the group is for optimizer 1"):
        opt.add_param_group({"params": [w0], "combined_part": 1})
    single = Combined(torch.optim.SGD([w0], lr=0.1))
    single.add_param_group({"params": [b1]})  # one part: the key may be left out
    assert len(single.param_groups) == 2


def _group_added_after_binding(route: str):
    """k=2 over both parts; after step 1 (bound) a third group joins the AdamW part."""
    torch.manual_seed(0)
    batches = make_batches(4)

    def parts(model):
        w0, b0, w1, b1, w2, b2 = model.parameters()
        return (torch.optim.SGD([w0, w1, w2], lr=0.05, momentum=0.9),
                torch.optim.AdamW([b0, b1], lr=0.01)), b2

    ref = make_model(seed=0)
    (sgd, adamw), late = parts(ref)
    broadcast_one_by_one(list(ref.parameters()))
    for step, (x, y) in enumerate(batches, start=1):
        sgd.zero_grad()
        adamw.zero_grad()
        mse(ref(x), y).backward()
        sgd.step()
        adamw.step()
        if step == 1:
            adamw.add_param_group({"params": [late], "lr": 0.02})
        if step % 2 == 0:
            average_one_by_one([p for opt in (sgd, adamw) for g in opt.param_groups for p in g["params"]])

    model = make_model(seed=0)
    (sgd, adamw), late = parts(model)
    opt = LocalSGDOptimizer(Combined(sgd, adamw), k=2)
    for step, (x, y) in enumerate(batches, start=1):
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()
        if step == 1 and route == "part":
            adamw.add_param_group({"params": [late], "lr": 0.02})
        elif step == 1:
            opt.add_param_group({"params": [late], "lr": 0.02, "combined_part": 1})
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, [p.detach().clone() for p in model.parameters()])
    return params_of(ref), params_of(model), everyone


@pytest.mark.parametrize("route", ["part", "wrapper"])
def test_a_group_added_after_binding_is_averaged(ranks2, route):
    for ref, got, everyone in ranks2(_group_added_after_binding, route):
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for a, b in zip(everyone[0], everyone[1], strict=True):  # step 4 averaged: replicas equal,
            torch.testing.assert_close(a, b, rtol=0, atol=0)  # the late bias included


# -- 2. state_dict: torch's layout --------------------------------------------------------------

def _muon_adamw(model):
    matrices, rest = _split(model)
    return Combined(torch.optim.Muon(matrices, lr=0.02), torch.optim.AdamW(rest, lr=1e-2))


def test_state_dict_has_torch_layout_and_loads_the_old_one():
    model = make_model(seed=0)
    opt = LocalSGDOptimizer(_muon_adamw(model), k=4)
    batches = make_batches(6, rank=0)
    train_wrapped(model, opt, batches[:3])
    saved = _roundtrip(opt.state_dict())
    assert sorted(saved) == ["local_sgd", "param_groups", "state"]
    assert saved["local_sgd"]["num_steps"] == 3
    assert [(g["params"], g["combined_part"]) for g in saved["param_groups"]] == [([0, 1, 2], 0), ([3, 4, 5], 1)]
    assert sorted(saved["state"]) == [0, 1, 2, 3, 4, 5]
    assert sorted(saved["state"][0]) == ["momentum_buffer"] and sorted(saved["state"][3]) == ["exp_avg", "exp_avg_sq",
                                                                                            "step"]
    assert saved["state"][5]["step"].item() == 3.0
    inner = opt.optimizer
    torch.testing.assert_close(saved["state"][4]["exp_avg"], inner.optimizers[1].state[model[2].bias]["exp_avg"],
                               rtol=0, atol=0)
    old = _roundtrip({"combined": [part.state_dict() for part in inner.optimizers], "local_sgd": saved["local_sgd"]})
    train_wrapped(model, opt, batches[3:])
    uninterrupted = params_of(model)

    for state in (saved, old):
        resumed = make_model(seed=0)
        opt = LocalSGDOptimizer(_muon_adamw(resumed), k=4)
        train_wrapped(resumed, opt, batches[:3])  # the same weights; the state comes from the load
        opt.load_state_dict(copy.deepcopy(state))
        assert opt.num_steps == 3
        train_wrapped(resumed, opt, batches[3:])
        for a, b in zip(params_of(resumed), uninterrupted, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_load_state_dict_checks_every_part_before_loading_any():
    model = make_model(seed=0)
    opt = _muon_adamw(model)
    train_wrapped(model, opt, make_batches(1, rank=0))
    good = opt.state_dict()
    before = copy.deepcopy(opt.optimizers[0].state_dict())
    bad = copy.deepcopy(good)
    bad["param_groups"][1]["params"] = bad["param_groups"][1]["params"][:2]
    with pytest.raises(ValueError, match=r"a group of optimizer 1 \(AdamW\) with 2 parameters, where its group has 3"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(good)
    bad["param_groups"][0]["combined_part"] = 1
    with pytest.raises(ValueError, match=r"\[0, 2\] groups per optimizer, where these have \[1, 1\]"):
        opt.load_state_dict(bad)
    with pytest.raises(ValueError, match=r"\{'combined': \[3 state dicts\]\}"):
        opt.load_state_dict({"combined": [before] * 3})
    after = opt.optimizers[0].state_dict()
    torch.testing.assert_close(after["state"][0]["momentum_buffer"], before["state"][0]["momentum_buffer"],
                               rtol=0, atol=0)


def test_dcp_optimizer_state_dict_round_trips():
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    batches = make_batches(5, rank=0)
    model = make_model(seed=0)
    opt = _muon_adamw(model)
    train_wrapped(model, opt, batches[:3])
    for flatten in (False, True):
        options = StateDictOptions(flatten_optimizer_state_dict=flatten)
        saved = get_optimizer_state_dict(model, opt, options=options)
        if not flatten:
            assert sorted(saved["state"]) == sorted(n for n, _ in model.named_parameters())
            assert [g["combined_part"] for g in saved["param_groups"]] == [0, 1]
        fresh_model = make_model(seed=0)
        fresh_model.load_state_dict(model.state_dict())
        fresh = _muon_adamw(fresh_model)
        set_optimizer_state_dict(fresh_model, fresh, _roundtrip(saved), options=options)
        for a, b in zip(fresh.optimizers, opt.optimizers):
            for p, q in zip(a.param_groups[0]["params"], b.param_groups[0]["params"]):
                for key, value in b.state[q].items():
                    torch.testing.assert_close(a.state[p][key], value, rtol=0, atol=0)
        train_wrapped(fresh_model, fresh, batches[3:])
        reference = copy.deepcopy(model)
        ref_opt = _muon_adamw(reference)
        ref_opt.load_state_dict(opt.state_dict())
        train_wrapped(reference, ref_opt, batches[3:])
        for a, b in zip(params_of(fresh_model), params_of(reference), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def _checkpoint_helpers(path: str):
    """rank_state / load_rank_state and DCP's save of get_state_dict, a Combined inside, mid-period."""
    import torch.distributed.checkpoint as dcp

    from localsgd_optim import checkpoint

    batches = make_batches(10)

    def build():
        model = make_model(seed=0)
        return model, LocalSGDOptimizer(_muon_adamw(model), k=4)

    model, opt = build()
    train_wrapped(model, opt, batches)
    uninterrupted = params_of(model)

    model, opt = build()
    train_wrapped(model, opt, batches[:6])  # mid-period: the replicas differ
    at_save = params_of(model)
    mine = _roundtrip(checkpoint.rank_state(model, opt))
    dcp.save({"train": checkpoint.get_state_dict(model, opt)}, checkpoint_id=path)
    resumed = []
    for how in ("rank_state", "dcp"):
        model, opt = build()
        if how == "rank_state":
            checkpoint.load_rank_state(model, opt, mine)
        else:
            state = {"train": checkpoint.get_state_dict(model, opt)}
            dcp.load(state, checkpoint_id=path)
            checkpoint.set_state_dict(model, opt, state["train"])
        loaded = params_of(model)
        assert opt.num_steps == 6
        train_wrapped(model, opt, batches[6:])
        resumed.append((loaded, params_of(model)))
    return uninterrupted, at_save, resumed, sorted(mine["optimizer"]["state"])


def test_checkpoint_helpers_take_a_combined(ranks2, tmp_path):
    results = ranks2(_checkpoint_helpers, str(tmp_path / "ckpt"))
    for uninterrupted, at_save, resumed, names in results:
        assert names == sorted(n for n, _ in make_model().named_parameters())
        for loaded, final in resumed:
            for a, b in zip(loaded, at_save, strict=True):  # each rank its own weights
                torch.testing.assert_close(a, b, rtol=0, atol=0)
            for a, b in zip(final, uninterrupted, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(results[0][1][0], results[1][1][0]), "step 6 should be mid-period"


def _fsdp2_dcp(path: str):
    """One replica of two FSDP2 shards (as ``train_charlm.py --shard 2`` on 2 ranks), Muon + AdamW."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from localsgd_optim import checkpoint

    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("replicate", "shard"))
    batches = make_batches(6, rank=0)  # every shard sees the same batch (one replica)

    def build():
        model = make_model(seed=0)
        for layer in (model[0], model[2], model):
            fully_shard(layer, mesh=mesh["shard"])
        return model, LocalSGDOptimizer(_muon_adamw(model), k=2, process_group=mesh["replicate"])

    def shards(model):
        return [p.to_local().detach().clone() for p in model.parameters()]

    model, opt = build()
    train_wrapped(model, opt, batches)
    uninterrupted = shards(model)
    model, opt = build()
    train_wrapped(model, opt, batches[:3])
    dcp.save({"train": checkpoint.get_state_dict(model, opt)}, checkpoint_id=path)
    model, opt = build()
    state = {"train": checkpoint.get_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=path)
    checkpoint.set_state_dict(model, opt, state["train"])
    num_steps = opt.num_steps
    train_wrapped(model, opt, batches[3:])
    return uninterrupted, shards(model), num_steps


def test_fsdp2_sharded_combined_resumes_through_dcp(ranks2, tmp_path):
    for uninterrupted, resumed, num_steps in ranks2(_fsdp2_dcp, str(tmp_path / "ckpt")):
        assert num_steps == 3
        for a, b in zip(resumed, uninterrupted, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


# -- 3. defaults: momentum-cycling schedulers ----------------------------------------------------

def _cyclic(kind: str, opt, lrs):
    if kind == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[4 * lr for lr in lrs], total_steps=8)
    return torch.optim.lr_scheduler.CyclicLR(opt, base_lr=lrs, max_lr=[4 * lr for lr in lrs], step_size_up=3)


@pytest.mark.parametrize("kind", ["onecycle", "cyclic"])
def test_momentum_cycling_schedulers_drive_momentum_and_betas(kind):
    batches = make_batches(7, rank=0)

    def parts(model):
        matrices, rest = _split(model)
        return torch.optim.SGD(matrices, lr=0.02, momentum=0.5), torch.optim.AdamW(rest, lr=0.01)

    ref = make_model(seed=0)
    ref_parts = parts(ref)
    alone = [LocalSGDOptimizer(part, k=3) for part in ref_parts]
    ref_scheds = [_cyclic(kind, opt, [g["lr"] for g in opt.param_groups]) for opt in alone]
    model = make_model(seed=0)
    sgd, adamw = parts(model)
    opt = LocalSGDOptimizer(Combined(sgd, adamw), k=3)
    assert opt.defaults["momentum"] == 0.5 and "betas" not in opt.defaults
    assert "betas" not in sgd.param_groups[0] and adamw.param_groups[0]["momentum"] == 0.9  # beta1, not SGD's
    sched = _cyclic(kind, opt, [0.02, 0.01])
    # what each part steps with: (lr, SGD's momentum or AdamW's betas), alone and combined
    stepped: dict[str, list] = {"alone": [], "combined": []}
    for name, (a, b) in (("alone", ref_parts), ("combined", (sgd, adamw))):
        a.register_step_pre_hook(lambda o, *_, name=name: stepped[name].append(
            (o.param_groups[0]["lr"], o.param_groups[0]["momentum"])))
        b.register_step_pre_hook(lambda o, *_, name=name: stepped[name].append(
            (o.param_groups[0]["lr"], o.param_groups[0]["betas"])))
    for x, y in batches:
        for o in [opt, *alone]:
            o.zero_grad()
        mse(model(x), y).backward()
        mse(ref(x), y).backward()
        for o in [opt, *alone]:
            o.step()
        for s in [sched, *ref_scheds]:
            s.step()
        assert sched.get_last_lr() == [s.get_last_lr()[0] for s in ref_scheds]
    assert stepped["combined"] == stepped["alone"]
    momenta = [m for _, m in stepped["alone"][0::2]]
    assert len(set(momenta)) >= 3 and all(0.8 <= m <= 0.95 for m in momenta), momenta  # really cycled
    assert [b[0] for _, b in stepped["alone"][1::2]] == momenta and stepped["alone"][1][1][1] == 0.999
    for a, b in zip(params_of(model), params_of(ref), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_defaults_hold_what_every_part_has():
    model = make_model(seed=0)
    matrices, rest = _split(model)
    muon, adamw = torch.optim.Muon(matrices, lr=0.02), torch.optim.AdamW(rest, lr=1e-3)
    assert Combined(muon, adamw).defaults == {"lr": 0.02, "weight_decay": 0.1, "eps": 1e-07, "momentum": 0.95}
    sgd = torch.optim.SGD(matrices, lr=0.05, momentum=0.9)
    adagrad = torch.optim.Adagrad(rest, lr=0.01)
    defaults = Combined(sgd, adagrad).defaults
    assert "momentum" not in defaults and defaults["lr"] == 0.05  # Adagrad has no momentum: nothing to cycle
    with pytest.raises(ValueError, match="optimizer must support momentum or beta1"):
        torch.optim.lr_scheduler.OneCycleLR(LocalSGDOptimizer(Combined(sgd, adagrad), k=2), max_lr=0.1,
                                            total_steps=4)


# -- the rest of the Optimizer contract ------------------------------------------------------------

def test_deepcopy_keeps_the_parts_and_the_docstring_example_runs():
    import localsgd_optim.combined

    model = make_model(seed=0)
    opt = LocalSGDOptimizer(_muon_adamw(model), k=4)
    train_wrapped(model, opt, make_batches(2, rank=0))
    twin = copy.deepcopy(opt)
    assert [type(p).__name__ for p in twin.optimizer.optimizers] == ["Muon", "AdamW"]
    assert twin.param_groups[1]["params"][0] is not opt.param_groups[1]["params"][0]
    assert len(twin.state) == 6
    result = doctest.testmod(localsgd_optim.combined, extraglobs={"torch": torch}, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
