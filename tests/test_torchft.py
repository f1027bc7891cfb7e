"""Our rounds under torchft (``LocalSGDOptimizer(..., manager=)``): its quorum, commit vote and heals.

Each replica group is its own world (one process here), as under torchft: a real
``LighthouseServer``, one ``torchft.Manager`` per group with ``use_async_quorum=False`` (as
DiLoCo requires), and torchft's ``ProcessGroupGloo``. With no failure the result must equal the
plain path bit for bit. Failures are real: a process that exits mid-period or inside a round, a
vote injected against a round, a new process for a lost group that heals from the survivor
through torchft's own transport, and one that cannot (another model).
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

pytest.importorskip("torchft", reason="torchft is an optional extra: pip install -e '.[ft]'")

from workers import process_context  # noqa: E402

K, STEPS = 4, 8


def _methods():
    from localsgd_optim import diloco, quantize, topk

    return {"plain": {}, "diloco": {"outer_optimizer": diloco()},
            "topk2bit": {"outer_optimizer": diloco(), "compression": topk(0.25, bits=2, chunk=64)},
            "int4": {"compression": quantize(4, chunk=64)},
            "int2rs": {"outer_optimizer": diloco(), "compression": quantize(2, chunk=64, collective="reduce_scatter")},
            "fragments": {"outer_optimizer": diloco(), "fragments": 2},  # (heal test only)
            "timed": {"outer_optimizer": diloco(), "round_every_s": float(K)}}  # (heal test only: see _start)


def _rounds_at_4_and_12(step: int) -> int:
    """The schedule a run whose round at step 8 was undone must equal: rounds at 4 and 12 only."""
    return 4 if step < 4 else 8


def _round_at_4_only(step: int) -> int:
    return 4 if step < 4 else 100


def _train(method: str, replica: int, process_group, before_round=None, after_round=None, manager=None,
           k: Any = K, steps: int = STEPS, die_at: int | None = None, width: int = 16, opts=None) -> list[list[float]]:
    """Train ``steps`` steps; the data of a step depends only on (replica, step), so a replica that
    heals and continues from the donor's step count reads what it would have read there."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, width), nn.Tanh(), nn.Linear(width, 2))
    opt, step = _start(model, k, process_group, manager, method, opts, after_round)
    while step < steps:
        step += 1
        g = torch.Generator().manual_seed(1000 * replica + step)
        x, y = torch.randn(4, 8, generator=g), torch.randn(4, 2, generator=g)
        if step == die_at:
            os._exit(0)  # the host is gone, mid-period
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if step % K == 0 and before_round is not None:
            before_round(step)
        opt.step()
        if step % K == 0 and after_round is not None:
            after_round(step, opt)
        step = opt.num_steps  # (a heal moves it to the donor's)
    return [p.detach().flatten().tolist() for p in model.parameters()]


def _plain_path(methods: list[str], k: Any = K, steps: int = STEPS):
    return {m: _train(m, dist.get_rank(), None, k=k, steps=steps) for m in methods}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replica_group(replica: int, lighthouse: str, groups: int, methods: list[str], out, mode: str = "managed",
                   events: dict[str, Any] | None = None, width: int = 16, steps: int = STEPS) -> None:
    """One replica group (one process, its own world) under a torchft Manager.

    Modes: "managed" (healthy), "undo round 2" (this group fails in each run's second round), "kill mid-period"
    / "kill mid-round" (group 1 dies at step 6 / right after the quorum of the round at step 8),
    "heal" (group 1 dies at step 6; a new process for it joins before the round at step 12: see
    ``events``), "returning" (that new process, possibly with another ``width``).
    """
    from torchft import Manager, ProcessGroupGloo

    torch.set_num_threads(1)
    live = mode in ("kill mid-period", "kill mid-round", "heal", "returning")
    port = _free_port()
    store = dist.TCPStore("127.0.0.1", port, 1, True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)  # this replica group's own world
    pg = ProcessGroupGloo(timeout=timedelta(seconds=30))
    manager = Manager(pg=pg, min_replica_size=1 if live else groups, load_state_dict=None, state_dict=None,
                      use_async_quorum=False, lighthouse_addr=lighthouse, replica_id=f"replica{replica}",
                      store_addr="127.0.0.1", store_port=port, rank=0, world_size=1, timeout=timedelta(seconds=30))
    pg.register("torchft")
    collectives: list[str] = []
    for name in ("allreduce", "allgather", "allgather_into_tensor_coalesced", "broadcast", "reduce_scatter",
                 "alltoall_base"):
        if hasattr(pg, name):  # count what our rounds dispatch on torchft's group
            setattr(pg, name, (lambda f, n: lambda *a, **kw: (collectives.append(n), f(*a, **kw))[1])(
                getattr(pg, name), name))
    events = events or {}
    try:
        if "ready" in events:  # every group heartbeats before any asks for a quorum: the first one has them all
            events["ready"].wait()
            time.sleep(0.3)
        result: dict[str, Any] = {}
        counts: list[Any] = []
        quorum = manager.start_quorum
        calls = [0]

        def start_quorum(**kwargs: Any) -> None:
            calls[0] += 1
            if mode == "returning":
                events["rejoining"].set()  # (the survivor waits for this before its round at step 12)
            quorum(**kwargs)
            if mode == "undo round 2" and replica == 1 and calls[0] == 3:  # (start, round 1, round 2)
                manager.report_error(RuntimeError("injected: this group's round failed"))
            if mode == "kill mid-round" and replica == 1 and calls[0] == 3:
                os._exit(0)  # gone inside the round at step 8, after its quorum formed
        manager.start_quorum = start_quorum
        seen: dict[str, Any] = {}

        def before_round(step: int) -> None:
            if mode == "heal" and step == 12:  # the new process for group 1 is asking to join
                events["rejoining"].wait(60)
                time.sleep(1.0)  # (its quorum request reaches the lighthouse first, even under load)

        def after_round(step: int, opt: Any) -> None:
            if mode == "heal" and step == 8:
                events["round 8 done"].set()
            if mode == "diverge" and step == 4:  # as if each had trained alone since: the round at 8 forms a new
                opt.managed._quorum_id = None    # quorum at the same torchft step, with group 1's state its own
                if replica == 1:
                    with torch.no_grad():  # (the state dict holds the live global copy)
                        for t in opt.state_dict()["local_sgd"]["outer"]["global"] + opt.param_groups[0]["params"]:
                            t.add_(0.5)
                    opt.managed.lineage = 0  # (older than group 0's: group 1 must heal)
            entry = opt.state_dict()["local_sgd"]
            outers = [f["outer"] for f in entry["fragments"]] if "fragments" in entry else [entry.get("outer", {})]
            seen[step] = {"residual": sum(r.abs().sum().item() for r in entry.get("ef_residuals", [])),
                          "global": [g.flatten().tolist() for outer in outers for g in outer.get("global", [])],
                          "params": [p.detach().flatten().tolist() for p in opt.param_groups[0]["params"]],
                          "num_steps": opt.num_steps, "rounds": opt.num_rounds}

        per_method = {}
        for m in methods:
            calls[0] = 0
            del collectives[:]
            opts: list[Any] = []
            try:
                result[m] = _train(m, replica, None, before_round, after_round, manager, steps=steps, width=width,
                                   die_at=6 if mode in ("kill mid-period", "heal") and replica == 1 else None,
                                   opts=opts)
            except Exception as e:  # noqa: BLE001 - a returning replica that cannot heal: its error is the result
                import traceback
                out.put((replica, None, {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()},
                         [o.managed.heals for o in opts]))
                return
            managed = opts[0].managed
            counts += [managed.rounds_committed, managed.rounds_rolled_back]
            per_method[m] = list(collectives)
        counts.append(manager.current_step())  # torchft's own count of committed rounds
        out.put((replica, manager.participating_rank(), {**result, "seen": seen, "heals": managed.heals,
                                                       "collectives": per_method}, counts))
    finally:
        manager.shutdown(wait=False)


def _run_groups(groups: int, methods: list[str], mode: str, width: int = 16, steps: int = STEPS) -> list[Any]:
    """Run ``groups`` replica groups and return each one's result; with a failure mode, group 1's
    process dies and (modes "heal" and "returning") a new process for it rejoins."""
    from torchft._torchft import LighthouseServer

    live = mode in ("kill mid-period", "kill mid-round", "heal", "returning")
    lighthouse = LighthouseServer(bind="[::]:0", min_replicas=1 if live else groups, join_timeout_ms=10000,
                                  quorum_tick_ms=100, heartbeat_timeout_ms=2000 if live else None)
    ctx = process_context()
    out = ctx.Queue()
    events = {"ready": ctx.Barrier(groups), "round 8 done": ctx.Event(), "rejoining": ctx.Event()} if live else {}
    survivor_mode = "heal" if mode == "returning" else mode
    procs = [ctx.Process(target=_replica_group, args=(r, lighthouse.address(), groups, methods, out, survivor_mode,
                                                      events, 16, steps)) for r in range(groups)]
    try:
        for p in procs:
            p.start()
        expected = groups - 1 if mode.startswith("kill") else groups
        if mode in ("heal", "returning"):
            procs[1].join(timeout=60)  # group 1 died at step 6
            assert events["round 8 done"].wait(60), "the survivor never committed its round at step 8"
            del events["ready"]
            procs.append(ctx.Process(target=_replica_group, args=(1, lighthouse.address(), groups, methods, out,
                                                                  "returning", events, width, steps)))
            procs[-1].start()
        results = sorted((out.get(timeout=120) for _ in range(expected)), key=lambda r: r[0])
    finally:
        _reap(procs, lighthouse)
    return results


def _reap(procs: list[Any], lighthouse: Any) -> None:
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    lighthouse.shutdown()


@pytest.mark.parametrize("groups", [2, 3])
def test_managed_rounds_equal_the_plain_path(groups, request):
    """``Managed`` does the quorum and the vote itself: the same numbers as the plain path (the same code
    on one gloo world of as many ranks), every round kept, for plain averaging, DiLoCo, and top-k 2-bit,
    int4 and a 2-bit reduce-scatter of pseudo-gradients with error feedback (their payloads go through
    the list-form all-gather that torchft's groups need)."""
    methods = ["plain", "diloco", "topk2bit", "int4", "int2rs"]
    plain = request.getfixturevalue(f"ranks{groups}")(_plain_path, methods)
    for replica, rank, result, counts in _run_groups(groups, methods, "managed"):
        assert counts == [STEPS // K, 0] * len(methods) + [len(methods) * (STEPS // K + 1)], \
            (replica, counts, result.get("trace"))
        assert result["heals"] == []  # (torchft's first quorum made them equal: no heal from a peer ahead)
        for method in methods:
            assert result[method] == plain[replica][method], f"{method}: replica {replica}"
            # start(): the new quorum's vote; then a round is its control gather, one collective per
            # bucket (one bucket here: an all-reduce, or the chunked compressors' all-gather; the
            # reduce-scatter's all-to-all then all-gather), and the commit vote; the first round binds
            # (one more gather). torchft's DiLoCo: one all-reduce per tensor.
            data = {"topk2bit": ["allgather"], "int4": ["allgather"], "int2rs": ["alltoall_base", "allgather"]}
            round_ = ["allgather", *data.get(method, ["allreduce"]), "allreduce"]
            assert result["collectives"][method] == ["allreduce"] + ["allgather"] + round_ * (STEPS // K), method


def test_a_round_one_group_votes_against_is_undone_on_every_participant(ranks2):
    """Group 1 fails in the round of step 8. torchft's vote is per group, so group 0 alone would keep
    it; ``Managed`` undoes it on both, and torchft's step counts stay equal. Oracle: the plain path
    with rounds at steps 4 and 12 only, bit for bit, DiLoCo's global copy and momentum and top-k's
    residuals included (they decide the round at 12)."""
    methods = ["plain", "diloco", "topk2bit"]
    plain = ranks2(_plain_path, methods, _rounds_at_4_and_12, 12)
    for replica, rank, result, counts in _run_groups(2, methods, "undo round 2", steps=12):
        assert counts == [2, 1] * len(methods) + [3 * len(methods)], (replica, counts)
        for method in methods:
            assert result[method] == plain[replica][method], f"{method}: replica {replica}"


@pytest.mark.parametrize("when", ["mid-round"])  # (mid-period: in the heal test below)
def test_a_group_lost_leaves_the_survivor_training(when, ranks2):
    """Group 1 dies at step 6, or inside the round at step 8 (after its quorum formed). Group 0's
    round at 8 waits for the lighthouse to drop it (heartbeat timeout 2 s), or fails and is undone;
    it binds to the quorum of one and trains on: no step redone. Oracle for plain averaging: the
    plain path that averages at step 4 only (a round alone changes nothing)."""
    plain = ranks2(_plain_path, ["plain"], _round_at_4_only, 12)
    [(replica, rank, result, counts)] = _run_groups(2, ["plain"], f"kill {when}", steps=12)
    assert replica == 0 and counts == ([3, 0, 4] if when == "mid-period" else [2, 1, 3])  # (torchft counts start() too)
    assert result["plain"] == plain[0]["plain"]


@pytest.mark.parametrize("method", ["topk2bit", "fragments", "timed"])
def test_a_returning_group_heals_from_the_survivor_and_joins_its_round(method):
    """Group 1 dies at step 6; group 0 commits its round at 8 alone; a new process for group 1 starts
    and heals from group 0 inside the quorum of the round at step 12, then joins that round sending
    nothing. After it, both replicas hold the same global copy and step count, the joiner's residuals
    are zero (the donor's are its own), and the survivor redid no step: it committed every round
    (4, 8, 12, 16). top-k 2-bit: both end bit-identical at step 16. Streaming DiLoCo (2 fragments,
    the last synced at 12 and 16, the other at 10 and 14): the joiner starts the fragment not synced
    at 12 from its global copy (the donor's progress since step 10 counts once), and the globals agree.
    Time-budgeted rounds (a clock that reads the step count, so rounds fall every 4 steps): the joiner
    takes the donor's round count and time into the period too, and both end bit-identical."""
    results = _run_groups(2, [method], "heal", steps=16)
    (_, _, survivor, counts0), (_, _, joiner, counts1) = results
    assert "error" not in joiner, joiner
    rounds = 16 // (K // 2 if method == "fragments" else K)  # (2 fragments: a round every 2 steps)
    assert counts0 == [rounds, 0, rounds + 1], counts0  # every round the survivor ran was kept; torchft's too
    assert counts1 == [rounds * 4 // 16 + 1, 0, rounds + 1], counts1  # the round it joined and those after
    assert survivor["heals"] == [] and [h["step"] for h in joiner["heals"]] == [12]
    assert joiner["heals"][0]["from"].startswith("replica0") and joiner["heals"][0]["in_step"]
    after = survivor["seen"][12], joiner["seen"][12]
    assert after[0]["global"] == after[1]["global"] and after[0]["num_steps"] == after[1]["num_steps"] == 12
    assert survivor["seen"][16]["global"] == joiner["seen"][16]["global"]
    if method == "topk2bit":
        assert after[1]["residual"] == 0 and after[0]["residual"] > 0
        assert survivor[method] == joiner[method]
    elif method == "timed":
        assert after[0]["rounds"] == after[1]["rounds"] == 3 and survivor[method] == joiner[method]
    else:
        assert after[1]["params"] == after[1]["global"] != after[0]["params"]
        assert after[0]["params"][2:] == after[0]["global"][2:]  # fragment 1 (the last Linear) synced at 12


def test_a_returning_group_with_another_layout_gets_a_clear_error_and_the_survivor_carries_on():
    results = _run_groups(2, ["diloco"], "returning", width=17, steps=16)
    (_, _, survivor, counts0), (_, _, joiner, _) = results
    assert "cannot heal from replica0" in joiner["error"] and "(17, 8)" in joiner["error"], joiner
    assert counts0 == [3, 1, 4], counts0  # 4, 8 and 16 kept; 12 skipped (nothing ran, nothing undone)


# -- sharded replicas: one Manager per rank, each rank's managed group joining its shard index's ranks ----------------


def _train_sharded(method: str, replica: int, shard: int, mesh, process_group=None, manager=None, steps: int = STEPS,
                   die_at: int | None = None, after_round=None, opts=None) -> list[list[float]]:
    """FSDP2 over ``mesh`` (one replica's shard ranks): the last Linear has 3 rows, so the two shards differ
    in shape (2 rows and 1) and a heal from the wrong shard would be refused. Data depends on (replica, shard, step)."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt, step = _start(model, K, process_group, manager, method, opts, after_round)
    while step < steps:
        step += 1
        if step == die_at:
            os._exit(0)  # the host (both ranks of its replica group) is gone, mid-period
        g = torch.Generator().manual_seed(1000 * replica + 100 * shard + step)
        x, y = torch.randn(4, 8, generator=g), torch.randn(4, 3, generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if step % K == 0 and after_round is not None:
            after_round(step, opt)
        step = opt.num_steps
    return [p.to_local().detach().flatten().tolist() for p in model.parameters()]


def _sharded_plain_path(methods: list[str], steps: int = STEPS):
    """The oracle: one world of 4 ranks, a (replicate, shard) mesh, averaged over mesh["replicate"]."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    replica, shard = divmod(dist.get_rank(), 2)
    return {m: _train_sharded(m, replica, shard, mesh["shard"], mesh.get_group("replicate"), steps=steps)
            for m in methods}


def _sharded_rank(replica: int, shard: int, lighthouse: str, port: int, methods: list[str], out, mode: str,
                  events: dict[str, Any], steps: int) -> None:
    """One rank of a replica group of 2 (its own gloo world and 1-D mesh), with its own Manager (group rank ``shard``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torchft import Manager, ProcessGroupGloo

    torch.set_num_threads(1)
    live = mode in ("heal", "returning")
    if mode == "returning":  # (started with the others, imports done: it starts once group 1 is gone)
        events["round 8 done"].wait(90)
    store = dist.TCPStore("127.0.0.1", port, 2, shard == 0)
    dist.init_process_group("gloo", store=store, rank=shard, world_size=2)  # this replica group's own world
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("shard",))
    pg = ProcessGroupGloo(timeout=timedelta(seconds=30))
    manager = Manager(pg=pg, min_replica_size=1 if live else 2, load_state_dict=None, state_dict=None,
                      use_async_quorum=False, lighthouse_addr=lighthouse, replica_id=f"replica{replica}",
                      store_addr="127.0.0.1", store_port=port, rank=shard, world_size=2, timeout=timedelta(seconds=30))
    pg.register("torchft")
    try:
        if "ready" in events:
            events["ready"].wait()
            time.sleep(0.3)
        if mode == "returning":
            quorum = manager.start_quorum

            def start_quorum(**kwargs: Any) -> None:
                events["rejoining"].set()  # (the survivor waits for this before its round at step 12)
                quorum(**kwargs)
            manager.start_quorum = start_quorum
        seen: dict[int, Any] = {}

        def after_round(step: int, opt: Any) -> None:
            if mode == "heal" and step == 8 and replica == 0:  # the round at 12 waits for the new group 1
                events["round 8 done"].set()
                events["rejoining"].wait(60)
                time.sleep(1.0)  # (its quorum request reaches the lighthouse first, even under load)
            inner = [opt.state[p] for p in opt.param_groups[0]["params"]]
            seen[step] = {"num_steps": opt.num_steps, "dtensors": all(type(s["exp_avg"]).__name__ == "DTensor"
                                                                       for s in inner),
                          "moments": [s[k].to_local().flatten().tolist() for s in inner for k in ("exp_avg", "exp_avg_sq")],
                          "global": [g.flatten().tolist() for g in opt.state_dict()["local_sgd"].get("outer", {})
                                     .get("global", [])]}

        result: dict[str, Any] = {}
        opts: list[Any] = []
        for m in methods:
            try:
                result[m] = _train_sharded(m, replica, shard, mesh, manager=manager, steps=steps, opts=opts,
                                           die_at=6 if mode == "heal" and replica == 1 else None,
                                           after_round=after_round)
            except Exception as e:  # noqa: BLE001
                import traceback
                out.put((replica, shard, {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}))
                return
        managed = opts[-1].managed
        out.put((replica, shard, {**result, "heals": managed.heals, "seen": seen,
                                  "counts": [managed.rounds_committed, managed.rounds_rolled_back,
                                             manager.current_step()]}))
    finally:
        manager.shutdown(wait=False)


def _run_sharded_groups(methods: list[str], mode: str, steps: int = STEPS) -> dict[tuple[int, int], Any]:
    from torchft._torchft import LighthouseServer

    live = mode == "heal"
    lighthouse = LighthouseServer(bind="[::]:0", min_replicas=1 if live else 2, join_timeout_ms=10000,
                                  quorum_tick_ms=100, heartbeat_timeout_ms=2000 if live else None)
    ctx = process_context()
    out = ctx.Queue()
    events = {"ready": ctx.Barrier(4), "round 8 done": ctx.Event(), "rejoining": ctx.Event()}
    ports = [_free_port(), _free_port(), _free_port()]  # (the third: group 1's new processes)

    def start(replica: int, shard: int, rank_mode: str) -> Any:
        port = ports[2 if rank_mode == "returning" else replica]
        proc = ctx.Process(target=_sharded_rank, args=(
            replica, shard, lighthouse.address(), port, methods, out, rank_mode,
            {k: v for k, v in events.items() if rank_mode != "returning" or k != "ready"}, steps))
        proc.start()
        return proc
    procs = [start(replica, shard, mode) for replica in (0, 1) for shard in (0, 1)]
    if live:  # group 1's new processes: they start once the survivor committed its round at step 8 alone
        procs += [start(1, shard, "returning") for shard in (0, 1)]
    try:
        results = {(r[0], r[1]): r[2] for r in (out.get(timeout=120) for _ in range(4))}
    finally:
        _reap(procs, lighthouse)
    return results


def test_sharded_replicas_average_each_shard_over_its_managed_group(ranks4):
    """Two replica groups of two FSDP2 ranks, one Manager per rank (group_rank = shard index): each rank's
    managed group joins the ranks holding the same shard, and the rounds average local shards over it. Oracle:
    the same model on one world with a (replicate, shard) mesh, averaged over mesh["replicate"]: bit for bit."""
    methods = ["plain", "diloco"]
    plain = ranks4(_sharded_plain_path, methods)
    results = _run_sharded_groups(methods, "managed")
    for (replica, shard), result in sorted(results.items()):
        assert "error" not in result, result
        assert result["counts"] == [STEPS // K, 0, len(methods) * (STEPS // K + 1)], result["counts"]
        assert result["heals"] == []
        for method in methods:
            assert result[method] == plain[2 * replica + shard][method], (method, replica, shard)


def test_a_sharded_replica_group_heals_shard_by_shard_from_the_survivor():
    """Both ranks of group 1 die at step 6; group 0 commits its round at 8 alone. New processes for group 1
    heal inside the quorum of the round at 12, each rank from the survivor's rank holding the same shard
    (torchft pairs group ranks; the shards differ in shape, so a wrong pairing is refused), and join that
    round. At the end (round 16) each shard is bit-identical across the groups; the survivor redid no step."""
    results = _run_sharded_groups(["diloco"], "heal", steps=16)
    assert all("error" not in r for r in results.values()), results
    for shard in (0, 1):
        survivor, joiner = results[0, shard], results[1, shard]
        assert survivor["counts"] == [4, 0, 5] and joiner["counts"] == [2, 0, 5], (survivor["counts"], joiner["counts"])
        assert survivor["heals"] == [] and [h["step"] for h in joiner["heals"]] == [12]
        assert joiner["heals"][0]["from"].startswith("replica0")
        # after the round at 12: the donor's warm Adam moments (local shards, wrapped back as DTensors) and global copy
        assert survivor["seen"][12] == joiner["seen"][12] and joiner["seen"][12]["dtensors"]
        assert survivor["diloco"] == joiner["diloco"]
    assert results[0, 0]["diloco"] != results[0, 1]["diloco"]


def test_replicas_at_the_same_step_with_different_histories_heal_one_from_the_other():
    """Lone-quorum divergence: after the round at 4, group 1's state and lineage become its own (as if it had
    trained alone while group 0 did too), and the round at 8 opens a new quorum at the same torchft step,
    where torchft would heal neither. The lineages differ: that round is skipped on both, group 1 (the older
    lineage) steps back in torchft's count and heals from group 0 inside the quorum of the round at 12, joins
    it, and from then on both are bit-identical."""
    (_, _, first, counts0), (_, _, second, counts1) = _run_groups(2, ["diloco"], "diverge", steps=16)
    assert "error" not in second, second
    for step in (12, 16):  # (without the lineage, the global copies stay apart for good)
        assert first["seen"][step]["global"] == second["seen"][step]["global"], step
        assert first["seen"][step]["params"] == second["seen"][step]["params"], step
    assert first["diloco"] == second["diloco"]
    assert counts0 == counts1 == [3, 1, 4], (counts0, counts1)
    assert first["heals"] == [] and [h["step"] for h in second["heals"]] == [12]
    assert first["seen"][8]["global"] != second["seen"][8]["global"]  # (the round at 8 was skipped)


class _ManagerStub:
    """Only what the checks read before any quorum (argument validation: no collective runs)."""

    def __init__(self, **settings: Any) -> None:
        self._pg, self._use_async_quorum, self._init_sync, self.registered = object(), False, True, {}
        self.__dict__.update(settings)

    def register_state_dict_fn(self, key: str, load: Any, save: Any) -> None:
        self.registered[key] = (load, save)


@pytest.mark.parametrize("manager, options, error", [
    (_ManagerStub(_use_async_quorum=True), {}, "use_async_quorum=False (got True)"),
    (_ManagerStub(_init_sync=False), {}, "init_sync=True (got False)"),
    (_ManagerStub(), {"warmup_steps": 2}, "warmup_steps=2 is not supported under torchft"),
    (_ManagerStub(), {"overlap_steps": 1, "outer_optimizer": None}, "overlap_steps=1 is not supported"),
    (object(), {}, "manager must be a torchft.Manager"),
])
def test_a_manager_the_rounds_cannot_run_under_is_refused_by_name(manager, options, error):
    from localsgd_optim import LocalSGDOptimizer

    model = nn.Linear(2, 2)
    with pytest.raises((ValueError, TypeError), match=error.replace("(", r"\(").replace(")", r"\)")):
        LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), k=4, manager=manager, **options)


def test_a_round_before_start_is_refused_and_registers_the_heal_state():
    from localsgd_optim import LocalSGDError, LocalSGDOptimizer

    model, manager = nn.Linear(2, 2), _ManagerStub()
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), k=2, manager=manager)
    assert list(manager.registered) == ["localsgd_optim"] and opt.process_group is manager._pg
    model(torch.ones(1, 2)).sum().backward()
    opt.step()  # a local step needs no quorum
    with pytest.raises(LocalSGDError, match=r"call opt.managed.start\(\) once before the first step"):
        opt.step()


def test_torchfts_nccl_groups_count_as_nccl():
    """Their backend's name is the one they were registered under, not "nccl": the control tensor and the
    vote must still go to the GPU (what the type says)."""
    from torchft.process_group import ProcessGroupBabyNCCL, ProcessGroupNCCL

    from localsgd_optim._dist import is_nccl

    assert all(is_nccl(kind.__new__(kind)) for kind in (ProcessGroupNCCL, ProcessGroupBabyNCCL))
    # (torchft's gloo groups: every other test here binds on one, with the control tensor on the CPU)


def _start(model, k, process_group, manager, method, opts, after_round):
    """The optimizer (kept in ``opts`` if given) and the step to train from: 0, or the donor's after a heal
    (``after_round`` runs then: it joined the donor's round at that step)."""
    from localsgd_optim import LocalSGDOptimizer

    options = _methods()[method]
    opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=None if "round_every_s" in options else k,
                            process_group=process_group, manager=manager, **options)
    if "round_every_s" in options:  # a clock that reads the step count: a period of K "seconds" is K steps
        opt._cursor.clock = lambda: float(opt._cursor.step)
        opt._cursor.seek(0)
    if opts is not None:
        opts.append(opt)
    step = opt.managed.start() if manager is not None else 0
    if step and after_round is not None:
        after_round(step, opt)
    return opt, step


def test_a_groups_slot_is_forgotten_with_the_group():
    """The slot ``Managed`` registers for its group dies with the group: a later group at the same address
    must not inherit it."""
    import gc

    from localsgd_optim._dist import _RANKS, group_rank, rank_from

    class Group:  # (stands for torchft's ProcessGroupGloo, a Python subclass)
        pass

    group = Group()
    rank_from(group, lambda: 3)
    assert group_rank(group) == 3 and id(group) in _RANKS
    key = id(group)
    del group
    gc.collect()
    assert key not in _RANKS
