"""checkpoint.consolidate: every rank's own checkpoint becomes one state that resumes at another world size."""

from __future__ import annotations

import contextlib
import io
import warnings

import pytest
import torch

from helpers import make_batches, make_model, params_of, train_wrapped
from localsgd_optim import LocalSGDOptimizer, checkpoint, diloco

K = 4


def _build(outer: bool):
    model = make_model(seed=0)
    opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=K,
                            outer_optimizer=diloco() if outer else None)
    return model, opt


def _saved(model, opt) -> dict:
    """What a rank writes: a weights_only round trip of its own model and optimizer."""
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _train_and_save(outer: bool, steps: int):
    """Train mid-period, save this rank's state; then sync() to get what consolidation must equal."""
    torch.manual_seed(1234 + torch.distributed.get_rank())  # per-rank RNG: differs, cannot be averaged
    model, opt = _build(outer)
    train_wrapped(model, opt, make_batches(steps))
    state = _saved(model, opt)
    opt.sync()
    return state, params_of(model)


def _resume(state: dict, outer: bool, steps: int):
    model, opt = _build(outer)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    loaded = params_of(model), opt.num_steps
    train_wrapped(model, opt, make_batches(steps))
    return loaded, params_of(model), opt.num_steps


def _mean(tensors):  # the oracle: a plain Python sum over ranks, divided by their count
    return sum(tensors[1:], tensors[0].clone()) / len(tensors)


@pytest.mark.parametrize("outer", [False, True], ids=["average", "diloco"])
@pytest.mark.parametrize("saved_on,resumed_on", [(3, 2), (2, 3)], ids=["3to2", "2to3"])
def test_consolidate_resumes_at_another_world_size(ranks2, ranks3, outer, saved_on, resumed_on):
    save_ranks, resume_ranks = (ranks3, ranks2) if saved_on == 3 else (ranks2, ranks3)
    saved = save_ranks(_train_and_save, outer, 6)  # step 6: mid-period for k=4, replicas differ
    states = [s for s, _ in saved]
    assert not torch.equal(states[0]["model"]["0.weight"], states[1]["model"]["0.weight"])
    state = checkpoint.consolidate(states)

    # The weights are what a sync() at save time made (gloo's summation order: 1 ulp on 3 ranks).
    synced = saved[0][1]
    exact = saved_on == 2
    for got, want in zip(state["model"].values(), synced):
        torch.testing.assert_close(got, want, rtol=0 if exact else 1.3e-7, atol=0 if exact else 1e-7)
    # The inner optimizer's moments are every rank's mean; the step counts are kept.
    for index, entry in state["opt"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(entry[key], _mean([s["opt"]["state"][index][key] for s in states]),
                                       rtol=0, atol=0)
        assert entry["step"].item() == 6
    assert state["opt"]["local_sgd"]["num_steps"] == 6
    assert torch.equal(state["rng"], states[0]["rng"])  # not averageable: rank 0's
    if outer:  # the global copy is the same on every rank and kept as it is
        for g, g0 in zip(state["opt"]["local_sgd"]["outer"]["global"], states[0]["opt"]["local_sgd"]["outer"]["global"]):
            assert g is g0

    results = resume_ranks(_resume, state, outer, 6)  # 6 more: two rounds (steps 8 and 12)
    for (loaded, num_steps), final, steps in results:
        assert num_steps == 6 and steps == 12
        for got, want in zip(loaded, state["model"].values()):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert all(torch.isfinite(p).all() for p in final)
    finals = [final for _, final, _ in results]
    for other in finals[1:]:  # step 12 is a round: the new world agrees again
        for a, b in zip(finals[0], other):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(finals[0][0], synced[0])  # and it trained on


def test_consolidate_of_one_rank_is_that_rank():
    model = make_model()
    state = {"model": model.state_dict(), "step": 3}
    merged = checkpoint.consolidate([state])
    assert merged["step"] == 3 and all(merged["model"][k] is v for k, v in state["model"].items())


def test_consolidate_mixed_structures():
    a = {"w": torch.tensor([1.0, 2.0]), "pair": (torch.tensor([1.0]), 5), "ids": torch.tensor([1, 2])}
    b = {"w": torch.tensor([3.0, 5.0]), "pair": (torch.tensor([4.0]), 5), "ids": torch.tensor([7, 8])}
    merged = checkpoint.consolidate([a, b])
    assert torch.equal(merged["w"], torch.tensor([2.0, 3.5]))
    assert isinstance(merged["pair"], tuple) and torch.equal(merged["pair"][0], torch.tensor([2.5]))
    assert merged["pair"][1] == 5
    assert torch.equal(merged["ids"], a["ids"])  # integers that differ are rank 0's


def _entry(num_steps):
    return {"state": {}, "param_groups": [], "local_sgd": {"version": 1, "num_steps": num_steps, "k": 4}}


@pytest.mark.parametrize("states,error,match", [
    ({"model": {}}, TypeError, "per_rank_states must be a list"),
    ([], ValueError, "per_rank_states is empty"),
    ([{"a": 1}, {"b": 1}], ValueError, r"rank 1's the state has keys \['b'\] but rank 0's has \['a'\]"),
    ([{"opt": _entry(8)}, {"opt": _entry(8)}, {"opt": _entry(12)}], ValueError,
     r"ranks 0 and 2 disagree on opt.local_sgd.num_steps \(8 vs 12\)"),
    ([{"opt": {"local_sgd": {"outer": {"global": [torch.ones(2)]}}}},
      {"opt": {"local_sgd": {"outer": {"global": [torch.zeros(2)]}}}}], ValueError,
     r"disagree on opt.local_sgd.outer.global.0 \(a torch.float32 tensor of shape \[2\]"),
])
def test_consolidate_refuses_bad_input(states, error, match):
    with pytest.raises(error, match=match):
        checkpoint.consolidate(states)


def test_lightning_callback_resumes_a_different_world_size_from_the_average():
    pytest.importorskip("pytorch_lightning", reason="install the integrations extra: pip install -e '.[integrations]'")
    from types import SimpleNamespace

    from localsgd_optim.lightning import LocalSGDCallback

    saved = []
    for seed in (1, 2):  # what two ranks saved: different weights, each its own optimizer state
        model = make_model(seed=seed)
        opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=K)
        train_wrapped(model, opt, make_batches(3, rank=seed))
        saved.append({"model": model.state_dict(), "optimizer": opt.state_dict()})
    for rank in range(3):  # resumed on 3 ranks
        checkpoint_dict = {"optimizer_states": [None], LocalSGDCallback.KEY: {"optimizer_index": 0, "ranks": saved}}
        callback = LocalSGDCallback()
        trainer = SimpleNamespace(global_rank=rank, world_size=3, state=SimpleNamespace(fn="fit"))
        with pytest.warns(UserWarning, match="holds the state of 2 ranks but this run has 3") if rank == 0 else \
                _no_warning():
            callback.on_load_checkpoint(trainer, None, checkpoint_dict)
        for key, weight in callback._own_weights.items():
            torch.testing.assert_close(weight, _mean([s["model"][key] for s in saved]), rtol=0, atol=0)
        state = checkpoint_dict["optimizer_states"][0]
        assert state["local_sgd"]["num_steps"] == 3
        torch.testing.assert_close(state["state"][0]["exp_avg"],
                                   _mean([s["optimizer"]["state"][0]["exp_avg"] for s in saved]), rtol=0, atol=0)


@contextlib.contextmanager
def _no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_load_per_rank_reads_own_file_or_consolidates_each_file_once(tmp_path, monkeypatch):
    """Oracle: the files themselves; own file at the same world size, their plain mean otherwise."""
    for r in range(2):
        torch.save({"world_size": 2, "w": torch.full((3,), float(r + 1)), "step": 5}, tmp_path / f"rank{r}.pt")
    reads, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda f, **kw: reads.append(f.name) or real_load(f, **kw))
    path_of = lambda r: tmp_path / f"rank{r}.pt"  # noqa: E731

    own, saved = checkpoint.load_per_rank(path_of, 1, 2)
    assert saved == 2 and torch.equal(own["w"], torch.full((3,), 2.0))
    assert reads == ["rank0.pt", "rank1.pt"]  # rank 0's names the saved world; then this rank's own
    for rank, world in ((1, 3), (2, 3), (0, 1)):  # more ranks (rank 2 has no file), fewer ranks
        reads.clear()
        merged, saved = checkpoint.load_per_rank(path_of, rank, world)
        assert saved == 2 and torch.equal(merged["w"], torch.full((3,), 1.5)) and merged["step"] == 5
        assert sorted(reads) == ["rank0.pt", "rank1.pt"]  # each saved file once


def test_load_per_rank_ignores_a_stale_file_and_consolidates_only_the_same_shard(tmp_path):
    """A shrunk run leaves the larger world's higher-rank files behind; sharded replicas average
    only the ranks that held the same shard (global rank = replica * shards + shard)."""
    path_of = lambda r: tmp_path / f"rank{r}.pt"  # noqa: E731
    for r in range(4):  # an old world of 4 at step 3, then a world of 2 at step 5 overwrote ranks 0 and 1
        torch.save({"world_size": 4, "w": torch.full((2,), 100.0), "step": 3}, path_of(r))
    for r in range(2):
        torch.save({"world_size": 2, "w": torch.full((2,), float(r + 1)), "step": 5}, path_of(r))
    merged, saved = checkpoint.load_per_rank(path_of, 2, 3)  # grown to 3: rank 2's own file is stale
    assert saved == 2 and merged["step"] == 5 and torch.equal(merged["w"], torch.full((2,), 1.5))
    for r in range(6):  # 3 replicas x 2 shards saved: shard r % 2 of each replica
        torch.save({"world_size": 6, "w": torch.full((2,), float(r)), "step": 7}, path_of(r))
    for rank in range(4):  # resumed as 2 replicas x 2 shards
        merged, saved = checkpoint.load_per_rank(path_of, rank, 4, shards=2)
        expected = (0 + 2 + 4) / 3 if rank % 2 == 0 else (1 + 3 + 5) / 3
        assert saved == 6 and torch.equal(merged["w"], torch.full((2,), expected))
    with pytest.raises(ValueError, match="whole number of replicas"):
        checkpoint.load_per_rank(path_of, 0, 4, shards=4)


# -- inner-optimizer state that exists on some ranks only ---------------------------------------------


def _heads_model():
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"trunk": torch.nn.Linear(6, 8), "heads": torch.nn.ModuleList(
        torch.nn.Linear(8, 2) for _ in range(3))})


def _train_own_head_and_save(path: str):
    """Each rank trains the trunk and its own task head only: AdamW has state for those alone."""
    import torch.distributed as dist

    from localsgd_optim.elastic import ElasticCheckpoint

    rank = dist.get_rank()
    model = _heads_model()
    opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=2)
    g = torch.Generator().manual_seed(rank)
    for _ in range(2):
        opt.zero_grad()
        x, y = torch.randn(4, 6, generator=g), torch.randn(4, 2, generator=g)
        torch.nn.functional.mse_loss(model["heads"][rank](model["trunk"](x)), y).backward()
        opt.step()
    ElasticCheckpoint(path).save(2, model, opt, blocking=True)
    return opt.state_dict()["state"]


def _resume_heads(path: str):
    from localsgd_optim.elastic import ElasticCheckpoint

    model = _heads_model()
    opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=2)
    resumed = ElasticCheckpoint(path).resume(model, opt)
    return resumed.message, opt.state_dict()["state"]


def test_a_resize_averages_each_parameters_state_over_the_ranks_that_have_it(ranks3, ranks2, tmp_path):
    """Per-rank task heads: rank r's AdamW has state for the trunk (params 0, 1) and head r only.
    Before: consolidate raised "rank 1's train.opt.state has keys ... but rank 0's has ...".
    Oracle: per parameter, the plain mean over the saving ranks that hold its state."""
    saved = ranks3(_train_own_head_and_save, str(tmp_path))
    assert [sorted(s) for s in saved] == [[0, 1, 2, 3], [0, 1, 4, 5], [0, 1, 6, 7]]
    for message, state in ranks2(_resume_heads, str(tmp_path)):
        assert message == "resumed at step 2: world 3 -> 2, consolidated"
        assert sorted(state) == list(range(8))
        for index, entry in state.items():
            holders = [s[index] for s in saved if index in s]
            assert len(holders) == (3 if index < 2 else 1)
            for key in ("exp_avg", "exp_avg_sq", "step"):
                want = holders[0][key].clone()
                for h in holders[1:]:
                    want += h[key]
                torch.testing.assert_close(entry[key], want / len(holders), rtol=0, atol=0)


def test_only_an_optimizers_per_parameter_state_may_differ_in_keys():
    a = {"opt": {"state": {0: {"m": torch.ones(2)}}, "param_groups": [{"params": [0, 1]}]}, "x": {"a": 1}}
    b = {"opt": {"state": {1: {"m": torch.zeros(2)}}, "param_groups": [{"params": [0, 1]}]}, "x": {"a": 1}}
    merged = checkpoint.consolidate([a, b])
    assert sorted(merged["opt"]["state"]) == [0, 1] and torch.equal(merged["opt"]["state"][0]["m"], torch.ones(2))
    with pytest.raises(ValueError, match=r"rank 1's x has keys \['b'\] but rank 0's has \['a'\]"):
        checkpoint.consolidate([a, dict(b, x={"b": 1})])


def test_a_users_dict_named_state_is_not_taken_for_an_optimizers():
    a = {"extra": {"loader": {"state": {"shard-3": {"offset": 1}}}}}
    b = {"extra": {"loader": {"state": {"shard-7": {"offset": 1}}}}}
    with pytest.raises(ValueError, match=r"rank 1's extra.loader.state has keys \['shard-7'\]"):
        checkpoint.consolidate([a, b])
