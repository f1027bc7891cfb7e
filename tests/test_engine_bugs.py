"""Issue 23's bugs, each found by hand in review, each with a test that failed before its fix.

1. ``overlap_steps`` silently stopped averaging ``buffers=`` (also with fragments).
2. Outer rounds corrupted parameters that share memory (a view, or the same Parameter twice).
3. The copy engine raced on shared memory: one tensor reduced in place, asynchronously, while
   a view of it was packed.
4. (frozen parameters: tests/test_frozen.py)
5. Casting the model kept the old flat storage alive until the next round.
Also: the NaN scan did not cover the averaged optimizer state.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.distributed as dist
from torch import nn

from localsgd_optim import LocalSGDOptimizer, NonFiniteParameterError, diloco


def _kw(kwargs: dict) -> dict:
    """The worker's keyword arguments: ``outer=(lr, momentum)`` becomes a DiLoCo outer optimizer
    (factories do not pickle to the workers)."""
    kwargs = dict(kwargs)
    if "outer" in kwargs:
        lr, momentum = kwargs.pop("outer")
        kwargs["outer_optimizer"] = diloco(lr=lr, momentum=momentum)
    return kwargs


# -- 1. overlapped rounds average the module buffers ----------------------------------------------

def _bn_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2))


def _overlap_buffers(kwargs: dict) -> tuple:
    rank = dist.get_rank()
    model = _bn_model(seed=rank)
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), buffers=model, bucket_cap_mb=0.0001,
                            **_kw(kwargs))
    g = torch.Generator().manual_seed(100 + rank)
    launched_mean = None
    for step in range(1, 6):
        x = torch.randn(8, 4, generator=g)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        if step == 4:  # the launch step: what every rank's running_mean is once the step's forward ran
            launched = model[1].running_mean.clone()
            launched_mean = launched.clone()
            dist.all_reduce(launched_mean)
            launched_mean /= dist.get_world_size()
        opt.step()
        if step == 4:
            after_launch = model[1].running_mean.clone()
    return after_launch, launched_mean, model[1].running_mean.clone()


@pytest.mark.parametrize("kwargs", [
    {"k": 4, "overlap_steps": 1},
    {"k": 4, "overlap_steps": 1, "outer": (0.7, 0.9)},
    {"k": 4, "fragments": 2, "overlap_steps": 1},
], ids=["overlap", "overlap-diloco", "fragments-overlap"])
def test_overlapped_rounds_average_module_buffers(ranks, kwargs):
    # Before the fix running_mean after the launch was each rank's own (bit-identical to a run
    # without buffers=): the in-flight round carried only the parameters' deltas.
    results = ranks(_overlap_buffers, kwargs)
    for after_launch, launched_mean, _ in results:  # averaged at the launch, blocking
        if ranks.world_size == 2:
            assert torch.equal(after_launch, launched_mean)
        else:  # 3 ranks: gloo's sum order depends on where an element sits in the bucket
            torch.testing.assert_close(after_launch, launched_mean, rtol=1e-6, atol=1e-7)
    assert all(torch.equal(r[0], results[0][0]) for r in results)


def _blocking_outer_buffers(kwargs: dict) -> tuple:
    rank = dist.get_rank()
    model = _bn_model(seed=rank)
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), buffers=model, **_kw(kwargs))
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(8, 4, generator=g)).pow(2).mean().backward()
        opt.step()
    return model[1].running_mean.clone(), model[1].running_var.clone()


@pytest.mark.parametrize("kwargs", [{"k": 4, "outer": (0.7, 0.9)}, {"k": 2, "fragments": 2}],
                         ids=["diloco", "fragments"])
def test_blocking_outer_and_fragment_rounds_average_module_buffers(ranks2, kwargs):
    (mean0, var0), (mean1, var1) = ranks2(_blocking_outer_buffers, kwargs)
    assert torch.equal(mean0, mean1) and torch.equal(var0, var1)


# -- 2. outer rounds and parameters that share memory ---------------------------------------------

def _aliased(kwargs: dict, duplicate: bool) -> list[torch.Tensor]:
    base = torch.zeros(4)
    a = nn.Parameter(base)
    b = a if duplicate else nn.Parameter(base[:2])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about a duplicate parameter
        opt = LocalSGDOptimizer(torch.optim.SGD([a, b], lr=0.0), k=1, **_kw(kwargs))
    with torch.no_grad():
        a.fill_(1.0 + dist.get_rank())  # 1.0 and 2.0: the mean is 1.5 (exact in bf16 too)
    opt.step()
    return [a.detach().clone(), b.detach().clone()]


@pytest.mark.parametrize("duplicate", [False, True], ids=["view", "same-parameter-twice"])
@pytest.mark.parametrize("kwargs", [
    {},
    {"compression": "bf16"},
    {"outer": (1.0, 0.0)},
    {"compression": "int8"},
    {"flat_params": False, "outer": (1.0, 0.0)},
    {"flat_params": False, "compression": "bf16"},
], ids=["plain", "bf16", "outer-sgd", "int8", "copy-engine-outer", "copy-engine-bf16"])
def test_parameters_sharing_memory_are_averaged_once(ranks2, kwargs, duplicate):
    # Before the fix bf16 and diloco(lr=1, momentum=0) gave [-1.5, -1.5, 1.5, 1.5]: the
    # in-place foreach neg_/add_ ran once per alias.
    for a, b in ranks2(_aliased, kwargs, duplicate):
        assert torch.equal(a, torch.full((4,), 1.5)), a
        assert torch.equal(b, a[: b.numel()])


# -- 3. the copy engine and shared memory --------------------------------------------------------

def _copy_engine_race() -> list[float]:
    a = nn.Parameter(torch.zeros(1024, 1024))
    b = nn.Parameter(a.data[:, :2])  # a view of a's memory, a parameter of its own
    opt = LocalSGDOptimizer(torch.optim.SGD([a, b], lr=0.0), k=1 << 20, flat_params=False, bucket_cap_mb=0.01,
                            sync_on_init=False)
    seen = []
    for _ in range(20):
        with torch.no_grad():
            a.fill_(1.0 + dist.get_rank())
        opt.sync()
        seen.append(sorted({a.min().item(), a.max().item(), b.min().item(), b.max().item()}))
    return seen


def test_copy_engine_never_reduces_shared_memory_in_place(ranks2):
    # Before the fix 2 of 20 rounds gave 2.0/2.5/3.0 somewhere instead of 1.5: a was reduced in
    # place asynchronously while b was packed from the same memory.
    for seen in ranks2(_copy_engine_race):
        assert all(values == [1.5] for values in seen), seen


# -- 5. casting the model frees the old flat storage at the next step ------------------------------

def _cast_frees_old_storage() -> tuple:
    torch.manual_seed(0)
    model = nn.Linear(1024, 1024)
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), k=4)
    opt.step()
    old = weakref.ref(opt.engine.storage.buffers[0])
    model.half()  # Module._apply rebinds p.data to new float16 tensors
    opt.step()  # not a round: the move is detected here, and the old storage dropped
    gc.collect()
    freed_at_step = old() is None
    opt.step()
    opt.step()  # the round re-plans: float16 storage, averaged
    dtypes = {b.dtype for b in opt.engine.storage.buffers}
    return freed_at_step, dtypes, model.weight.dtype


def test_casting_the_model_frees_the_old_storage_at_the_next_step(ranks2):
    # Before the fix the float32 storage (4 MiB here, 64 MiB in the report) stayed alive until the
    # next round: a plain optimizer freed it at model.half(), the wrapped one grew.
    for freed, dtypes, dtype in ranks2(_cast_frees_old_storage):
        assert freed
        assert dtypes == {torch.float16} and dtype == torch.float16


# -- the NaN scan covers the averaged optimizer state ------------------------------------------------

def _nan_in_optimizer_state() -> tuple:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), k=2, average_optimizer_state=True)
    message = "no error"
    for step in range(2):
        opt.zero_grad()
        model(torch.ones(3, 4)).sum().backward()
        if step == 1 and dist.get_rank() == 1:  # the state exists now: poison it (the update stays finite)
            opt.state[model.weight]["exp_avg_sq"][0, 0] = float("inf")
        try:
            opt.step()
        except NonFiniteParameterError as e:
            message = str(e)
    return message, bool(opt.state[model.weight]["exp_avg_sq"].isfinite().all())


def test_nan_scan_covers_averaged_optimizer_state(ranks2):
    # Before the fix the inf in rank 1's exp_avg_sq was averaged into every rank's state.
    (message0, finite0), (message1, finite1) = ranks2(_nan_in_optimizer_state)
    assert message0 == message1 and "exp_avg_sq" in message0 and "rank 1" in message0, message0
    assert finite0 and not finite1  # nothing was averaged


# -- found by the property tests (tests/test_properties.py) while this refactor was under way ----------

def _overlap_empty_of_two_dtypes() -> list[torch.Tensor]:
    params = [nn.Parameter(torch.zeros(0)), nn.Parameter(torch.zeros(0, dtype=torch.float64)),
              nn.Parameter(torch.full((3,), 1.0 + dist.get_rank()))]
    opt = LocalSGDOptimizer(torch.optim.SGD(params, lr=0.0), k=2, overlap_steps=1, overlap_mix=0.0)
    with torch.no_grad():
        params[2].fill_(1.0 + dist.get_rank())  # after the broadcast: 1.0 and 2.0
    for _ in range(3):  # launched at 2, landed at 3
        opt.step()
    return [p.detach().clone() for p in params]


def test_overlap_lands_with_empty_parameters_of_two_dtypes(ranks2):
    # Empty flat buffers all have data_ptr 0: re-laying views out by storage pointer mixed the
    # float32 and float64 ones up, and landing raised "assign a gradient with dtype 'double'".
    for empty32, empty64, p in ranks2(_overlap_empty_of_two_dtypes):
        assert empty32.dtype == torch.float32 and empty64.dtype == torch.float64
        assert torch.equal(p, torch.full((3,), 1.5))


def _outer_with_nothing_trainable() -> str:
    frozen = nn.Parameter(torch.ones(2), requires_grad=False)
    with pytest.raises(ValueError) as info:
        LocalSGDOptimizer(torch.optim.SGD([frozen], lr=0.1), k=2, outer_optimizer=diloco())
    return str(info.value)


def test_outer_rounds_refuse_a_model_with_nothing_trainable(ranks2):
    for message in ranks2(_outer_with_nothing_trainable):
        assert "at least one trainable floating-point parameter" in message, message


# -- found in review of this change ---------------------------------------------------------------

def _copy_engine_bf16_model_bf16_wire() -> list[float]:
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(1000).bfloat16())
    b1, b2 = nn.Parameter(torch.randn(10).bfloat16()), nn.Parameter(torch.randn(10).bfloat16())
    opt = LocalSGDOptimizer(torch.optim.SGD([w, b1, b2], lr=0.1), k=1, compression="bf16", flat_params=False,
                            bucket_cap_mb=0.001)
    with torch.no_grad():
        for p in (w, b1, b2):
            p.add_(dist.get_rank())
    opt.step()
    return [w[:3].float().tolist(), b1[:3].float().tolist()]


def test_copy_engine_bf16_model_with_a_bf16_wire(ranks2):
    # The packing buffers of a plain round (sized for packed buckets) were reused by the wire
    # round, whose buckets all go through them: "size of tensor a (20) must match ... (1000)".
    (w0, b0), (w1, b1) = ranks2(_copy_engine_bf16_model_bf16_wire)
    assert w0 == w1 and b0 == b1


def _load_while_in_flight() -> tuple:
    import copy

    torch.manual_seed(0)

    def build():
        model = nn.Linear(4096, 2048)  # 32 MiB: its round is still on the wire when the load comes
        return model, LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), k=4, overlap_steps=2,
                                        bucket_cap_mb=1.0)

    g = torch.Generator().manual_seed(dist.get_rank())
    batches = [torch.randn(4, 4096, generator=g) for _ in range(12)]
    model, opt = build()
    for step, x in enumerate(batches[:8], start=1):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        if step == 5:  # launched at 4, lands at 6: in flight
            saved_model = {k: v.clone() for k, v in model.state_dict().items()}
            saved = copy.deepcopy(opt.state_dict())
            loaded = copy.deepcopy(saved)
    opt.load_state_dict(loaded)  # right after step 8's launch: that round is on the wire
    model.load_state_dict(saved_model)
    fresh_model, fresh = build()
    fresh_model.load_state_dict(saved_model)
    fresh.load_state_dict(saved)
    for x in batches[5:9]:
        for m, o in ((model, opt), (fresh_model, fresh)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    return [p.detach().clone() for p in model.parameters()], [p.detach().clone() for p in fresh_model.parameters()]


def test_loading_a_checkpoint_while_a_round_is_in_flight(ranks2):
    # The round on the wire went on writing its undivided sum into the loaded mean.
    for got, want in ranks2(_load_while_in_flight):
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def _freeze_frees_its_share_of_the_storage() -> tuple:
    a, b = nn.Parameter(torch.randn(1 << 20)), nn.Parameter(torch.randn(1 << 20))  # 4 MiB each
    opt = LocalSGDOptimizer(torch.optim.SGD([a, b], lr=0.0), k=1)
    opt.step()
    together = a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    a.requires_grad_(False)
    opt.step()  # the round re-plans without a: b moves to new storage, a gets storage of its own
    return together, a.untyped_storage().nbytes(), b.untyped_storage().nbytes()


def test_freezing_a_parameter_frees_the_old_flat_storage(ranks2):
    # a's view kept the whole old 8 MiB buffer alive next to b's new 4 MiB one.
    for together, a_bytes, b_bytes in ranks2(_freeze_frees_its_share_of_the_storage):
        assert together and a_bytes == b_bytes == 4 << 20


def _state_cast_through_data_on_one_rank() -> str:
    from localsgd_optim import LayoutMismatchError

    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), k=2,
                            average_optimizer_state=True)
    message = "no error"
    for step in range(4):
        opt.zero_grad()
        model(torch.ones(3, 4)).sum().backward()
        if step == 2 and dist.get_rank() == 1:  # the state exists: rebind it through .data (same object)
            buf = opt.state[model.weight]["momentum_buffer"]
            buf.data = buf.data.double()
        try:
            opt.step()
        except LayoutMismatchError as e:
            message = str(e)
            break
    return message


def test_optimizer_state_rebound_through_data_is_caught_on_every_rank(ranks2):
    # The layout digest was recomputed only when the state tensors' ids changed: a .data rebind
    # kept the id, the digests went stale, and the ranks' collectives no longer matched (a hang).
    for message in ranks2(_state_cast_through_data_on_one_rank):
        assert "momentum_buffer" in message, message


def _alias_formed_after_binding() -> tuple:
    a, b, c = (nn.Parameter(torch.randn(8)) for _ in range(3))
    opt = LocalSGDOptimizer(torch.optim.SGD([a, b, c], lr=0.0), k=1)
    opt.step()
    b.data = a.data  # b now shares a's memory
    opt.step()  # the round re-plans: a and b staged, still one memory
    with torch.no_grad():
        a.add_(1)
    return a.data_ptr() == b.data_ptr(), torch.equal(a, b)


def test_parameters_made_to_share_memory_after_binding_keep_sharing_it(ranks2):
    # The re-plan gave every parameter leaving the storage a copy of its own: b stopped following a.
    for same_memory, equal in ranks2(_alias_formed_after_binding):
        assert same_memory and equal
