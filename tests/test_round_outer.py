"""Outer rounds (DiLoCo, SlowMo, bf16-cast deltas): parity with the reference loop, resume, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from helpers import assert_same, assert_state_equal, make_batches, make_model, params_of, resume_run, train_wrapped
from localsgd_optim import LocalSGDOptimizer, diloco, slowmo
from reference import reference_diloco


def _outer_sgd_lr1_is_plain_averaging():
    # Dyadic values: every sum and difference is exact, so lr=1.0 must give the mean bit for bit.
    rank = dist.get_rank()
    model = nn.Linear(8, 8)
    g = torch.Generator().manual_seed(rank)

    def dyadic():
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randint(-512, 512, p.shape, generator=g).float() / 8)

    dyadic()  # the global copy (rank 0's, after the broadcast) is dyadic too
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), k=[(None, 1)],  # k=1, no warning
                            outer_optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0))
    dyadic()
    local = params_of(model)
    opt.step()  # lr 0: only the round changes anything
    means = []
    for t in local:
        s = t.clone()
        dist.all_reduce(s)
        means.append(s / dist.get_world_size())
    return means, params_of(model)


def test_outer_sgd_lr1_equals_plain_averaging_exactly(ranks):
    # global - mean(global - p) == mean(p) bit for bit when dividing by the world size is exact
    # (2 ranks); with 3 it rounds twice instead of once: within an ulp.
    for mean, got in ranks(_outer_sgd_lr1_is_plain_averaging):
        assert_same(got, mean, exact=ranks.world_size == 2, rtol=0, atol=1e-5)  # 1 ulp at |global| <= 64


def _diloco_parity(preset, warmup):
    factory = {"diloco": diloco(), "slowmo": slowmo(lr=0.8, momentum=0.5), "outer_sgd": diloco(lr=1.5, momentum=0)}[preset]
    batches = make_batches(warmup + 12)  # ends on a round: replicas equal at the end
    ref = make_model(seed=dist.get_rank())
    reference_diloco(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2), batches, 4, factory, warmup)
    model = make_model(seed=dist.get_rank())
    opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=4, warmup_steps=warmup,
                            outer_optimizer=factory, bucket_cap_mb=0.01)
    train_wrapped(model, opt, batches)
    return params_of(ref), params_of(model)


@pytest.mark.parametrize("preset, warmup", [("diloco", 0), ("slowmo", 0), ("diloco", 3), ("outer_sgd", 0)])
def test_outer_presets_match_reference(ranks, preset, warmup):
    results = ranks(_diloco_parity, preset, warmup)
    for ref, got in results:
        assert_same(got, ref, exact=ranks.world_size == 2)
    for _, got in results[1:]:
        assert_same(got, results[0][1], exact=True)  # replicas equal after the last round


def _outer_resume():
    def build():
        model = make_model(seed=0)
        return model, LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=4, warmup_steps=2,
                                        outer_optimizer=diloco())

    # stopped at 9, mid-period: rounds at 6, 10, 14
    uninterrupted, resumed, ckpt = resume_run(build, make_batches(16), 9)
    return uninterrupted, resumed, sorted(ckpt["opt"]["local_sgd"]["outer"])


def test_outer_state_resumes_exactly(ranks):
    for uninterrupted, resumed, keys in ranks(_outer_resume):
        assert keys == ["global", "optimizer"]
        assert_same(resumed, uninterrupted, exact=True)


def test_single_worker_diloco_applies_the_outer_step():
    batches = make_batches(8, rank=0)
    model = make_model()
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), k=4, outer_optimizer=diloco())
    start = params_of(model)
    train_wrapped(model, opt, batches[:4])
    # by hand: one worker's pseudo-gradient is start - local; Nesterov SGD's first step with it
    ref = make_model()
    inner = torch.optim.SGD(ref.parameters(), lr=0.05)
    train_wrapped(ref, inner, batches[:4])
    for s, p, got in zip(start, params_of(ref), params_of(model)):
        delta = s - p
        buf = delta.clone()  # momentum buffer after the first step
        expected = s - 0.7 * (delta + 0.9 * buf)  # nesterov: grad + momentum * buf
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_outer_optimizer_bad_input():
    ps = make_model().parameters
    for preset in (diloco, slowmo):
        for momentum in (1.0, -0.1):
            with pytest.raises(ValueError, match=rf"{preset.__name__}\(momentum={momentum}\): the outer momentum must be in \[0, 1\)"):
                preset(momentum=momentum)
    assert diloco(momentum=0)([nn.Parameter(torch.ones(2))]).defaults["nesterov"] is False
    with pytest.raises(TypeError, match="outer_optimizer must be a callable.*got str"):
        LocalSGDOptimizer(torch.optim.SGD(ps(), lr=0.1), k=4, outer_optimizer="diloco")
    with pytest.raises(ValueError, match="outer_optimizer needs sync_on_init=True"):
        LocalSGDOptimizer(torch.optim.SGD(ps(), lr=0.1), k=4, outer_optimizer=diloco(), sync_on_init=False)
    with pytest.raises(TypeError, match="it returned list"):
        LocalSGDOptimizer(torch.optim.SGD(ps(), lr=0.1), k=4, outer_optimizer=lambda p: list(p))
    plain = LocalSGDOptimizer(torch.optim.SGD(ps(), lr=0.1), k=4)
    with_outer = LocalSGDOptimizer(torch.optim.SGD(ps(), lr=0.1), k=4, outer_optimizer=diloco())
    with pytest.warns(UserWarning, match="no outer-optimizer state"):
        with_outer.load_state_dict(plain.state_dict())
    with pytest.raises(ValueError, match="add_param_group is not supported with an outer_optimizer"):
        with_outer.add_param_group({"params": [nn.Parameter(torch.ones(2))]})
    with pytest.raises(ValueError, match="does not support complex parameters"):
        LocalSGDOptimizer(torch.optim.SGD([nn.Parameter(torch.ones(2, dtype=torch.complex64))], lr=0.1),
                          k=4, compression="int8")


def _bf16_parity(explicit_outer):
    batches = make_batches(12)
    outer = diloco() if explicit_outer else (lambda ps: torch.optim.SGD(ps, lr=1.0))
    ref = make_model(seed=dist.get_rank())
    reference_diloco(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2), batches, 4, outer, wire=torch.bfloat16)
    model = make_model(seed=dist.get_rank())
    opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=4, compression="bf16",
                            outer_optimizer=diloco() if explicit_outer else None, bucket_cap_mb=0.01)
    train_wrapped(model, opt, batches)
    slots = [str(dtype) for dtype in opt.engine.buffer_dtypes()]
    return params_of(ref), params_of(model), slots


@pytest.mark.parametrize("explicit_outer", [False, True], ids=["averaging", "diloco"])
def test_bf16_compressed_deltas_match_reference(ranks, explicit_outer):
    for ref, got, slots in ranks(_bf16_parity, explicit_outer):
        assert "torch.bfloat16" in slots  # the data phase really went through bf16 buffers
        assert_same(got, ref, exact=ranks.world_size == 2, rtol=1e-2, atol=1e-3)


def test_compression_bad_value():
    with pytest.raises(ValueError, match=r"compression must be None, 'bf16', 'int8', 'int4', 'int2', or .*got 'fp8'"):
        LocalSGDOptimizer(torch.optim.SGD(make_model().parameters(), lr=0.1), k=4, compression="fp8")

    with pytest.raises(ValueError, match="compression='bf16' with buffers= is not supported"):
        LocalSGDOptimizer(torch.optim.SGD(make_model().parameters(), lr=0.1), k=4, compression="bf16",
                          buffers=make_model())


def _mixed_configs(case):
    from localsgd_optim import LayoutMismatchError

    rank = dist.get_rank()
    model = make_model(seed=0)
    kwargs = {"outer": {"outer_optimizer": diloco()}, "compression": {"compression": "bf16"}}[case] if rank == 1 else {}
    with pytest.raises(LayoutMismatchError) as info:
        LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), k=4, **kwargs)
    dist.barrier()
    return str(info.value)


@pytest.mark.parametrize("case", ["outer", "compression"])
def test_ranks_with_different_outer_or_compression_raise_everywhere(ranks2, case):
    messages = ranks2(_mixed_configs, case)
    assert len(set(messages)) == 1
    assert {"outer": "ranks disagree on outer_optimizer", "compression": "ranks disagree on compression"}[case] \
        in messages[0]


def _moved_after_construction():
    model = make_model(seed=0)
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), k=2, outer_optimizer=diloco())
    model.double()
    batches = [(x.double(), y.double()) for x, y in make_batches(2)]
    train_wrapped(model, opt, batches[:1])
    before = params_of(model)
    with pytest.raises(ValueError, match="move or cast the model before constructing"):
        train_wrapped(model, opt, batches[1:])  # step 2: the round
    dist.barrier()
    return before, params_of(model)


def test_model_cast_after_construction_with_outer_is_a_clear_error(ranks2):
    for before, after in ranks2(_moved_after_construction):
        # the error came before any pseudo-gradient was written: only the local step happened
        assert all(torch.isfinite(p).all() for p in after)
        assert all(a.dtype == torch.float64 for a in after)


# -- bug 2 (found in review): a malformed outer entry raised after the inner state was replaced

@pytest.mark.parametrize("corrupt, match", [
    (lambda outer: outer.update({"global": outer["global"][:-1]}), r"\['outer'\] must hold a 'global' list"),
    (lambda outer: outer["global"].__setitem__(0, torch.ones(3)), r"\['outer'\] must hold a 'global' list"),
    (lambda outer: outer["optimizer"]["param_groups"][0].update({"params": [0]}),
     r"\['outer'\]\['optimizer'\] must be a state dict of the same optimizer"),
    (lambda outer: outer.pop("optimizer"), r"\['outer'\]\['optimizer'\] must be a state dict"),
], ids=["global-count", "global-shape", "optimizer-groups", "optimizer-missing"])
def test_malformed_outer_entry_raises_before_anything_changes(corrupt, match):
    model = make_model()
    opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=2, outer_optimizer=diloco())
    train_wrapped(model, opt, make_batches(5, rank=0))
    good = opt.state_dict()
    bad = copy.deepcopy(good)
    bad["param_groups"][0]["lr"] = 0.5  # what a half-done load would leave behind
    bad["local_sgd"]["num_steps"] = 1
    corrupt(bad["local_sgd"]["outer"])
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(bad)
    assert_state_equal(opt.state_dict(), good)
    assert opt.param_groups[0]["lr"] == 1e-2 and opt.num_steps == 5


def _outer_state(factory):
    from localsgd_optim._flat import rebase
    from localsgd_optim._outer import OuterState

    g = torch.Generator().manual_seed(0)
    params = [torch.randn(n, generator=g) for n in (1, 7, 33, 130, 1000)]  # tensors end between SIMD lanes
    outer = OuterState(params, factory)
    means = [torch.randn(p.shape, generator=g) * 1e-3 for p in params]
    flats = [torch.empty_like(f) for f in outer.flat]
    for view, mean in zip(rebase(outer.globals, outer.flat, flats), means):  # the means, laid out alike
        view.copy_(mean)
    return outer, flats, means


@pytest.mark.parametrize("case", ["plain", "lr", "momentum", "fused", "scheduler", "hook", "adam"])
def test_a_plain_average_outer_step_is_one_subtraction_with_sgds_bits(monkeypatch, case):
    """SGD(lr=1.0) and nothing else steps the flat global copy with one sub_ per buffer; anything that
    would make its step another computation (or skipping it visible) takes the optimizer's own step."""
    from localsgd_optim import _outer

    factory = {"plain": lambda ps: torch.optim.SGD(ps, lr=1.0), "lr": lambda ps: torch.optim.SGD(ps, lr=0.5),
               "momentum": lambda ps: torch.optim.SGD(ps, lr=1.0, momentum=0.9),
               "fused": lambda ps: torch.optim.SGD(ps, lr=1.0, fused=True),
               "scheduler": lambda ps: torch.optim.SGD(ps, lr=1.0), "hook": lambda ps: torch.optim.SGD(ps, lr=1.0),
               "adam": lambda ps: torch.optim.Adam(ps, lr=1.0)}[case]
    results = []
    for fast in (True, False):
        outer, flats, means = _outer_state(factory)
        if case == "scheduler":
            torch.optim.lr_scheduler.ConstantLR(outer.optimizer, factor=1.0, total_iters=1)
        if case == "hook":
            outer.optimizer.register_step_post_hook(lambda *a: None)
        assert _outer._subtracts(outer.optimizer) == (case == "plain")
        if not fast:
            monkeypatch.setattr(_outer, "_subtracts", lambda optimizer: False)
        outer.apply(flats, [m.clone() for m in means])
        results.append([f.clone() for f in flats])
        monkeypatch.undo()
    assert all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(*results))
