"""The benchmark's seams: ``agree_on_round`` on torch's fake process group (what
``python -m localsgd_optim.bench --fake-world N`` runs on, with nothing patched), and the
floor rows of the real benchmark (flat ``AVG``; check + ``SUM`` + divide; ``SUM`` + divide).

The fake-group tests run in this process: they initialize the fake default group and destroy
it afterwards (the rest of the suite runs its ranks in worker processes).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from localsgd_optim import LocalSGDOptimizer, NonFiniteParameterError, ScheduleMismatchError
from localsgd_optim import _binding, _dist, bench
from localsgd_optim._dist import RoundKind, agree_on_round

FAKE_WORLD = 4


@pytest.fixture
def fake_world():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=FAKE_WORLD)
    try:
        yield FAKE_WORLD
    finally:
        dist.destroy_process_group()


def _no_collective(*args, **kwargs):
    raise AssertionError("agree_on_round issued a collective on a fake group")


def _no_layout_check():
    raise AssertionError("explain_layout called: the fake table must always agree with itself")


def test_agree_on_round_on_a_fake_group_counts_every_rank_without_a_collective(fake_world, monkeypatch):
    monkeypatch.setattr(dist, "all_gather", _no_collective)
    cpu = torch.device("cpu")
    # Any step counts, kinds and digest: the table is this rank's row repeated, so it always agrees.
    for kind, steps, start in [(RoundKind.SYNC, 0, 0), (RoundKind.SCHEDULED, 17, 3), (RoundKind.BIND, 5, 5)]:
        assert agree_on_round(None, cpu, kind, steps, start, 123456789, _no_layout_check) == (fake_world, False, False)
    # A subgroup of the fake world: its own size.
    sub = dist.new_group([0, 1])
    assert agree_on_round(sub, cpu, RoundKind.LOCAL, 4, 0, 1, _no_layout_check) == (2, False, False)
    # Every rank is this one: if it has joined, nobody is left training.
    assert agree_on_round(None, cpu, RoundKind.SYNC, 4, 0, 1, _no_layout_check, joined=True) == (0, False, False)
    # The same verdict code: this rank's own NaN and its own local error still raise.
    with pytest.raises(NonFiniteParameterError, match="w2"):
        agree_on_round(None, cpu, RoundKind.SYNC, 4, 0, 1, _no_layout_check, nonfinite=2,
                       names=lambda: ["w0", "w1", "w2"])
    with pytest.raises(MemoryError, match="mine"):
        agree_on_round(None, cpu, RoundKind.SYNC, 4, 0, 1, _no_layout_check, local_error=MemoryError("mine"))


def test_optimizer_rounds_run_on_a_fake_group(fake_world, monkeypatch):
    monkeypatch.setattr(dist, "all_gather", _no_collective)  # the control gather must not reach the fake group
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 4))  # 3.3 KB
    k = 3
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), k=k, bucket_cap_mb=0.001)
    x, y = torch.randn(5, 8), torch.randn(5, 4)
    for _ in range(2 * k):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    opt.sync()
    assert opt.stats()["rounds"] == 3  # two scheduled rounds and the sync, none refused
    assert len(opt.engine.buckets) > 1  # several buckets at this cap: each went through its collective


def test_bench_fake_world_runs_unpatched(fake_world, capsys):
    text = open(bench.__file__).read()
    assert "_control_without_peers" not in text and "_binding" not in text and "from ._buckets" not in text
    report = bench.main(["--fake-world", str(fake_world), "--models", "2x32", "--bucket-cap-mb", "0.02",
                         "--rounds", "1", "--warmup", "0"])
    assert _binding.PendingAgreement is _dist.PendingAgreement  # nothing was patched
    (model,) = report["models"]
    assert model["buckets"] > 1
    rows = {row["method"]: row for row in model["rounds"]}
    assert rows["localsgd_optim sync"]["ops"] < rows["torch average_parameters"]["ops"]
    assert f"{model['buckets']} buckets of 0.02 MB" in capsys.readouterr().out


def test_floor_rows_are_selectable_and_on_by_default(fake_world):
    torch.manual_seed(0)
    model = bench.build_model(1, 32)
    floors = ["flat limit (1 all-reduce, no packing)", "flat AVG", "floor: check + SUM + divide",
              "floor: SUM + divide"]
    chosen = bench._contenders(model, fake_world, [25.0], {"flat_avg", "floor_check", "floor"})
    assert [c.name for c in chosen] == floors
    everything = [c.name for c in bench._contenders(model, fake_world, [25.0], None)]
    assert everything[:4] == floors and "localsgd_optim sync (cap 25 MB)" in everything
    assert [c.name for c in bench._contenders(model, fake_world, [25.0], {"floor"})] == [floors[0], floors[3]]
    for c in chosen:
        c.prepare()
        c.setup()
        c.round()
        assert c.buf.numel() == sum(p.numel() for p in model.parameters())
    args = bench.parse_args(["--methods", "flat", "flat_avg", "floor_check", "floor", "ours"])
    assert args.methods == ["flat", "flat_avg", "floor_check", "floor", "ours"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--methods", "flat_sum"])


# -- real gloo ranks ---------------------------------------------------------------------------

def _floors_and_control_on_gloo() -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    params = [torch.zeros(3, 5), torch.zeros(7)]
    out = {}
    for c in (bench.FlatAvg("avg", params, world), bench.FloorSumDivide("check", params, world, check=True),
              bench.FloorSumDivide("sum", params, world, check=False)):
        c.setup()
        c.buf.fill_(float(rank + 1))
        c.round()
        out[c.name] = c.buf.clone()
    cpu = torch.device("cpu")
    out["count"] = agree_on_round(None, cpu, RoundKind.SYNC, 4, 0, 1, _no_layout_check)
    try:
        agree_on_round(None, cpu, RoundKind.SYNC, 4 + rank, 0, 1, _no_layout_check)
        out["mismatch"] = None
    except ScheduleMismatchError as e:
        out["mismatch"] = str(e)
    return out


def test_floors_average_and_control_unchanged_on_gloo(ranks2):
    for out in ranks2(_floors_and_control_on_gloo):
        for name in ("avg", "check", "sum"):  # gloo takes AVG for floats; every floor averages
            assert torch.equal(out[name], torch.full((22,), 1.5)), name
        assert out["count"] == (2, False, False)
        assert out["mismatch"] is not None and "out of step" in out["mismatch"]
