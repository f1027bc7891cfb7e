"""Frozen parameters (``requires_grad=False``): never averaged, never sent; broadcast once at binding.

torch's averagers skip parameters without gradients; so does a round here. The model is a frozen
``Embedding(1000, 16)`` (64,000 bytes) in front of a trainable ``Linear(16, 4)`` (272 bytes), so
sending the frozen weights would dominate every round's bytes.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from helpers import assert_same, mse
from localsgd_optim import LayoutMismatchError, LocalSGDError, LocalSGDOptimizer, diloco
from reference import average_one_by_one, broadcast_one_by_one

# 209 bytes: the Linear's weight (256 bytes) and bias (16) each get a bucket of their own, so
# a bucket reduces exactly what a per-parameter all-reduce does: bit-exact on 3 ranks too.
ONE_TENSOR_PER_BUCKET_MB = 0.0002
STEPS, K = 4, 2


class _Frozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(1000, 16)
        self.emb.weight.requires_grad_(False)
        self.lin = nn.Linear(16, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lin(self.emb(tokens).mean(1))


def _batches(n: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + dist.get_rank())
    return [(torch.randint(0, 1000, (8, 5), generator=g), torch.randn(8, 4, generator=g)) for _ in range(n)]


@torch.no_grad()
def _scramble_frozen(model: _Frozen) -> torch.Tensor:
    """Give the frozen weight values of this rank's own; return a copy."""
    g = torch.Generator().manual_seed(7 + dist.get_rank())
    model.emb.weight.copy_(torch.randn(model.emb.weight.shape, generator=g))
    return model.emb.weight.detach().clone()


def _trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


def _step(model: nn.Module, opt: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    opt.zero_grad()
    mse(model(batch[0]), batch[1]).backward()
    opt.step()


def _reference(batches, frozen: torch.Tensor) -> list[torch.Tensor]:
    """The oracle: plain SGD, trainable parameters broadcast once, then averaged one by one every K steps."""
    model = _Frozen()
    trainable = [p for p in model.parameters() if p.requires_grad]
    broadcast_one_by_one(trainable)
    with torch.no_grad():
        model.emb.weight.copy_(frozen)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    for step, batch in enumerate(batches, start=1):
        _step(model, inner, batch)
        if step % K == 0:
            average_one_by_one(trainable)
    return _trainable(model)


def _reference_diloco(batches, frozen: torch.Tensor, factory) -> list[torch.Tensor]:
    """The oracle for an outer optimizer over the trainable parameters only (tests/reference.py's loop)."""
    model = _Frozen()
    params = [p for p in model.parameters() if p.requires_grad]
    broadcast_one_by_one(params)
    with torch.no_grad():
        model.emb.weight.copy_(frozen)
    world = dist.get_world_size()
    global_copy = [p.detach().clone() for p in params]
    outer = factory(global_copy)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    for step, batch in enumerate(batches, start=1):
        _step(model, inner, batch)
        if step % K:
            continue
        with torch.no_grad():
            for g, p in zip(global_copy, params):
                delta = g - p
                dist.all_reduce(delta)
                g.grad = delta / world
            outer.step()
            for g, p in zip(global_copy, params):
                g.grad = None
                p.copy_(g)
    return _trainable(model)


def _frozen_run(variant):
    batches = _batches()
    model = _Frozen()
    kwargs = {"k": K, "bucket_cap_mb": ONE_TENSOR_PER_BUCKET_MB}
    if variant == "copy_engine":
        kwargs["flat_params"] = False
    elif variant == "diloco":
        kwargs["outer_optimizer"] = diloco()
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)
    # After construction, so sync_on_init's broadcast is not what makes the replicas agree.
    frozen = _scramble_frozen(model)
    for batch in batches:
        _step(model, opt, batch)
    want = _reference_diloco(batches, frozen, diloco()) if variant == "diloco" else _reference(batches, frozen)
    trainable_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return frozen, model.emb.weight.detach().clone(), _trainable(model), want, opt.stats(), trainable_bytes


@pytest.mark.parametrize("variant", ["flat", "copy_engine", "diloco"])
def test_frozen_parameters_are_not_averaged_nor_sent(ranks3, variant):
    results = ranks3(_frozen_run, variant)
    for rank, (before, after, got, want, stats, trainable_bytes) in enumerate(results):
        changed = after != before
        assert not changed.any(), f"rank {rank}: {int(changed.sum())} frozen elements changed " \
                                  f"(max {float((after - before).abs().max()):.3g})"
        assert_same(got, want, exact=True)
        assert trainable_bytes == (16 * 4 + 4) * 4
        assert stats["rounds"] == STEPS // K
        assert stats["bytes_sent"] == trainable_bytes * (STEPS // K), stats
    assert not torch.equal(results[0][0], results[1][0])  # the frozen weights really differed per rank
    for r in results[1:]:
        assert_same(r[2], results[0][2], exact=True)  # the trainable replicas agree after the last round


# -- sync_on_init: the frozen parameters are broadcast once, at binding ---------------------------

def _frozen_broadcast_at_binding(flat_params):
    model = _Frozen()
    mine = _scramble_frozen(model)  # before construction: the binding's broadcast must fix it
    ptr = model.emb.weight.data_ptr()
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), k=K, flat_params=flat_params)
    after_bind = model.emb.weight.detach().clone()
    rank0 = mine.clone()
    dist.broadcast(rank0, 0)
    return mine, after_bind, rank0, model.emb.weight.data_ptr() == ptr, opt.stats()["bytes_sent"]


@pytest.mark.parametrize("flat_params", [True, False], ids=["flat", "copy_engine"])
def test_frozen_parameters_are_broadcast_once_at_binding(ranks3, flat_params):
    for rank, (mine, after_bind, rank0, same_storage, sent) in enumerate(ranks3(_frozen_broadcast_at_binding,
                                                                                flat_params)):
        assert torch.equal(after_bind, rank0), f"rank {rank}: the frozen weight is not rank 0's after binding"
        assert rank == 0 or not torch.equal(mine, rank0)
        assert same_storage, "a frozen parameter was moved into flat storage"
        assert sent == 0  # the binding is no round


# -- gradual unfreezing: a plain round averages what is trainable at that round -------------------

def _unfreeze_mid_run():
    batches = _batches(2 * STEPS)
    model = _Frozen()
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), k=K,
                            bucket_cap_mb=ONE_TENSOR_PER_BUCKET_MB)
    frozen = _scramble_frozen(model)

    ref = _Frozen()
    broadcast_one_by_one([p for p in ref.parameters() if p.requires_grad])
    with torch.no_grad():
        ref.emb.weight.copy_(frozen)
    inner = torch.optim.SGD(ref.parameters(), lr=0.1)

    sent = []
    for step, batch in enumerate(batches, start=1):
        if step == STEPS + 1:  # on every rank: the embedding trains from here, and is averaged
            model.emb.weight.requires_grad_(True)
            ref.emb.weight.requires_grad_(True)
        _step(model, opt, batch)
        _step(ref, inner, batch)
        if step % K == 0:
            average_one_by_one([p for p in ref.parameters() if p.requires_grad])
            sent.append(opt.stats()["bytes_sent"])
    return [p.detach().clone() for p in model.parameters()], [p.detach().clone() for p in ref.parameters()], sent


def test_unfrozen_parameter_is_averaged_from_the_next_round(ranks3):
    results = ranks3(_unfreeze_mid_run)
    linear, emb = (16 * 4 + 4) * 4, 1000 * 16 * 4
    for got, want, sent in results:
        assert_same(got, want, exact=True)
        assert sent == [linear, 2 * linear, 3 * linear + emb, 4 * linear + 2 * emb], sent
    for got, _, _ in results[1:]:
        assert_same(got, results[0][0], exact=True)  # the embedding too, now it is averaged


def _freeze_mid_run_with_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), k=K, buffers=model)
    g = torch.Generator().manual_seed(dist.get_rank())
    x = [torch.randn(6, 4, generator=g) for _ in range(2 * K)]
    for step, batch in enumerate(x, start=1):
        if step == K + 1:  # on every rank: the Linear's weight is frozen, with values of each rank's own
            model[0].weight.requires_grad_(False)
            with torch.no_grad():
                model[0].weight.add_(dist.get_rank())
            frozen = model[0].weight.detach().clone()
            buffer_ptr = model[1].running_mean.data_ptr()
        opt.zero_grad()
        model(batch).sum().backward()
        opt.step()
    return (frozen, model[0].weight.detach().clone(), model[1].running_mean.data_ptr() == buffer_ptr,
            model[1].running_mean.detach().clone())


def test_frozen_mid_run_is_left_alone_and_buffers_keep_their_storage(ranks3):
    results = ranks3(_freeze_mid_run_with_buffers)
    for frozen, after, buffer_kept, _ in results:
        assert torch.equal(after, frozen)
        assert buffer_kept, "a module buffer was moved into flat storage when the parameters shrank"
    for r in results[1:]:
        assert torch.equal(r[3], results[0][3])  # the buffer is still averaged


def _lr0_group_is_averaged_not_trained():
    torch.manual_seed(0)
    model = nn.Linear(16, 4)
    inner = torch.optim.AdamW([{"params": [model.weight], "lr": 0.0, "weight_decay": 0.0},
                               {"params": [model.bias]}], lr=1e-2, weight_decay=0.1)
    opt = LocalSGDOptimizer(inner, k=K, bucket_cap_mb=ONE_TENSOR_PER_BUCKET_MB)
    g = torch.Generator().manual_seed(dist.get_rank())
    with torch.no_grad():
        model.weight.copy_(torch.randn(model.weight.shape, generator=g))
    want = [model.weight.detach().clone()]
    average_one_by_one(want)
    for _ in range(K):
        opt.zero_grad()
        model(torch.randn(8, 16, generator=g)).sum().backward()
        opt.step()
    return model.weight.detach().clone(), want[0]


def test_a_parameter_in_an_lr0_group_is_averaged_but_not_trained(ranks3):
    for got, want in ranks3(_lr0_group_is_averaged_not_trained):
        assert torch.equal(got, want)


def test_members_device_is_read_afresh_from_the_first_averaged_tensor():
    # Binding.control_device (NCCL only: the control tensor must sit on the GPU of the tensors
    # averaged now) is Members.device(); no NCCL here, so the derivation is tested on its own,
    # with the meta device standing in for a second GPU.
    from types import SimpleNamespace

    from localsgd_optim._binding import Members

    frozen, trained = nn.Parameter(torch.zeros(2), requires_grad=False), nn.Parameter(torch.zeros(3))
    group = {"params": [frozen, trained]}
    members = Members(SimpleNamespace(param_groups=[group], state={}), None)
    assert members.device() == torch.device("cpu")
    group["params"][1] = trained = nn.Parameter(torch.zeros(3, device="meta"))  # as if moved to another device
    assert members.device() == torch.device("meta")  # the frozen one, first, is skipped
    trained.requires_grad_(False)
    assert members.device() is None and members.params() == [] and members.frozen() == [frozen, trained]


# -- ranks that disagree on what is frozen -------------------------------------------------------

def _frozen_on_one_rank_only():
    model = nn.Linear(4, 3)
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), k=K)
    if dist.get_rank() == 1:
        model.weight.requires_grad_(False)
    x = torch.ones(2, 4)
    with pytest.raises(LayoutMismatchError) as info:
        for _ in range(K):
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
    dist.barrier()  # nobody is stuck in a collective
    return str(info.value), opt.num_steps


def test_ranks_that_freeze_different_parameters_raise_on_every_rank(ranks2):
    results = ranks2(_frozen_on_one_rank_only)
    messages = [m for m, _ in results]
    assert len(set(messages)) == 1, messages  # the same verdict everywhere
    assert "parameter (param group 0, index 0)" in messages[0], messages[0]
    assert "requires_grad=True on rank 0, requires_grad=False on rank 1" in messages[0], messages[0]
    assert [n for _, n in results] == [K, K]


# -- per-parameter state (a global copy) cannot follow a change of the trainable set ---------------

def _unfreeze_with_per_parameter_state(variant):
    model = _Frozen()
    kwargs = {"outer": {"outer_optimizer": diloco()}, "bf16": {"compression": "bf16"},
              "overlap": {"outer_optimizer": diloco(), "overlap_steps": 1},
              "fragments": {"fragments": 2}, "fragments_outer": {"fragments": 2, "outer_optimizer": diloco()}}[variant]
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), k=K, **kwargs)
    model.emb.weight.requires_grad_(True)  # on every rank
    with pytest.raises((LocalSGDError, ValueError)) as info:
        for batch in _batches():
            _step(model, opt, batch)
    dist.barrier()
    return type(info.value).__name__, str(info.value), opt.num_steps, opt.stats()["bytes_sent"]


@pytest.mark.parametrize("variant", ["outer", "bf16", "overlap", "fragments", "fragments_outer"])
def test_changing_the_trainable_set_with_a_global_copy_raises_on_every_rank(ranks2, variant):
    results = ranks2(_unfreeze_with_per_parameter_state, variant)
    for kind, message, num_steps, sent in results:
        assert kind == "ValueError", (kind, message)
        assert "number of trainable (requires_grad=True) parameters changed from 2 to 3" in message, message
        assert "construct LocalSGDOptimizer after" in message, message
        assert sent == 0  # raised before any data moved
    assert len({n for _, _, n, _ in results}) == 1
