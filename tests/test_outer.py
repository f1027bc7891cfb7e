"""Algorithms II, part one: outer optimizers (DiLoCo, SlowMo) against a reference loop."""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
from torch import nn

from helpers import make_batches, make_model, mse, params_of, resume_run, train_wrapped
from localsgd_optim import LocalSGDOptimizer, diloco, slowmo
from reference import broadcast_one_by_one
from test_distributed import assert_same


def reference_diloco(model, inner, batches, k, outer_factory, warmup=0, wire=None):
    """Plain loop: global copy; every k steps average (global - local) parameter by parameter,
    step the outer optimizer with it as .grad, write the global copy into the model."""
    params = list(model.parameters())
    broadcast_one_by_one(params)
    world = dist.get_world_size()
    global_copy = [p.detach().clone() for p in params]
    outer = outer_factory(global_copy)
    for step, (x, y) in enumerate(batches, start=1):
        inner.zero_grad()
        mse(model(x), y).backward()
        inner.step()
        with torch.no_grad():
            if step <= warmup:
                for p in params:
                    dist.all_reduce(p)
                    p.div_(world)
                if step == warmup:
                    for g, p in zip(global_copy, params):
                        g.copy_(p)
            elif (step - warmup) % k == 0:
                for g, p in zip(global_copy, params):
                    delta = (g - p) if wire is None else (g - p).to(wire)  # compressed on the wire
                    dist.all_reduce(delta)
                    g.grad = delta.to(g.dtype) / world  # widened, then divided at full precision
                outer.step()
                for g, p in zip(global_copy, params):
                    g.grad = None
                    p.copy_(g)


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
    factory = {"diloco": diloco(), "slowmo": slowmo(lr=0.8, momentum=0.5)}[preset]
    batches = make_batches(warmup + 12)  # ends on a round: replicas equal at the end
    ref = make_model(seed=dist.get_rank())
    reference_diloco(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2), batches, 4, factory, warmup)
    model = make_model(seed=dist.get_rank())
    opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=4, warmup_steps=warmup,
                            outer_optimizer=factory, bucket_cap_mb=0.01)
    train_wrapped(model, opt, batches)
    return params_of(ref), params_of(model)


@pytest.mark.parametrize("preset, warmup", [("diloco", 0), ("slowmo", 0), ("diloco", 3)])
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


# -- single process and bad input ----------------------------------------------------------

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
    slots = sorted({str(k[2]) for k in opt._comm.engine._slots})
    return params_of(ref), params_of(model), slots


@pytest.mark.parametrize("explicit_outer", [False, True], ids=["averaging", "diloco"])
def test_bf16_compressed_deltas_match_reference(ranks, explicit_outer):
    for ref, got, slots in ranks(_bf16_parity, explicit_outer):
        assert "torch.bfloat16" in slots  # the data phase really went through bf16 buffers
        assert_same(got, ref, exact=ranks.world_size == 2, rtol=1e-2, atol=1e-3)


def test_compression_bad_value():
    with pytest.raises(ValueError, match="compression must be None, 'bf16' or 'int8', got 'int4'"):
        LocalSGDOptimizer(torch.optim.SGD(make_model().parameters(), lr=0.1), k=4, compression="int4")

    with pytest.raises(ValueError, match="compression='bf16' with buffers= is not supported"):
        LocalSGDOptimizer(torch.optim.SGD(make_model().parameters(), lr=0.1), k=4, compression="bf16",
                          buffers=make_model())


def reference_int8_diloco(model, inner, batches, k, outer_factory):
    """Plain loop: per parameter, v = (global - local) + residual, per-tensor scale max|v|/127,
    int8 codes all-gathered one parameter at a time, summed in rank order, residual kept."""
    params = list(model.parameters())
    broadcast_one_by_one(params)
    world = dist.get_world_size()
    global_copy = [p.detach().clone() for p in params]
    residuals = [torch.zeros_like(p) for p in params]
    outer = outer_factory(global_copy)
    for step, (x, y) in enumerate(batches, start=1):
        inner.zero_grad()
        mse(model(x), y).backward()
        inner.step()
        if step % k:
            continue
        with torch.no_grad():
            for g, p, e in zip(global_copy, params, residuals):
                v = (g - p) + e
                scale = v.abs().max().clamp_min(torch.finfo(torch.float32).tiny) / 127
                q = torch.round(v / scale).clamp(-127, 127)
                e.copy_(v - q * scale)
                codes = [torch.empty_like(q, dtype=torch.int8) for _ in range(world)]
                scales = [torch.empty(1) for _ in range(world)]
                dist.all_gather(codes, q.to(torch.int8))
                dist.all_gather(scales, scale.reshape(1))
                total = torch.zeros_like(v)
                for c, s in zip(codes, scales):
                    total.add_(c.float() * s)
                g.grad = total / world
            outer.step()
            for g, p in zip(global_copy, params):
                g.grad = None
                p.copy_(g)


def _int8_parity():
    batches = make_batches(12)
    ref = make_model(seed=dist.get_rank())
    reference_int8_diloco(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2), batches, 4, diloco())
    model = make_model(seed=dist.get_rank())
    opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=4, compression="int8",
                            outer_optimizer=diloco(), bucket_cap_mb=0.01)
    train_wrapped(model, opt, batches)
    return params_of(ref), params_of(model), sum(r.abs().sum().item() for r in opt._int8.residuals)


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


# -- overlapped rounds (Streaming DiLoCo's delayed application) -----------------------------

def reference_overlapped(model, inner, batches, k, tau, mix, outer_factory):
    """Plain loop: at step r (r % k == 0) snapshot global - local per parameter and all-reduce
    it (blocking: the result is only used later); at r + tau: outer step with the mean, then
    p <- mix * p + (1 - mix) * global."""
    params = list(model.parameters())
    broadcast_one_by_one(params)
    world = dist.get_world_size()
    global_copy = [p.detach().clone() for p in params]
    outer = outer_factory(global_copy)
    pending = None
    for step, (x, y) in enumerate(batches, start=1):
        inner.zero_grad()
        mse(model(x), y).backward()
        inner.step()
        with torch.no_grad():
            if step % k == 0:
                pending = []
                for g, p in zip(global_copy, params):
                    d = g - p
                    dist.all_reduce(d)
                    pending.append(d / world)
            if pending is not None and step % k == tau:
                for g, d in zip(global_copy, pending):
                    g.grad = d
                outer.step()
                for g, p in zip(global_copy, params):
                    g.grad = None
                    p.lerp_(g, 1.0 - mix)
                pending = None


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
    with pytest.raises(ValueError, match="overlap_steps with compression is not supported yet"):
        LocalSGDOptimizer(torch.optim.SGD(ps(), lr=0.1), k=4, overlap_steps=1, compression="bf16")


# -- found in review ---------------------------------------------------------------------------

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
