"""Our rounds on torchft's reconfigurable process groups, under its Manager's quorum and commit vote.

Each replica group is its own world (one process here), as under torchft: a real
``LighthouseServer``, one ``torchft.Manager`` per group with ``use_async_quorum=False`` (as
DiLoCo requires), and torchft's ``ProcessGroupGloo``. Every global round opens with
``start_quorum()`` and closes with ``should_commit()``. With no failure the result must equal
the plain path (the same code on one gloo world of as many ranks) bit for bit: plain averaging,
DiLoCo, and top-k 2-bit pseudo-gradients with error feedback, whose payloads go through the
list-form all-gather that torchft's groups need.
"""

from __future__ import annotations

import multiprocessing as mp
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

K, STEPS = 4, 8


def _methods():
    from localsgd_optim import diloco, topk

    return {"plain": {}, "diloco": {"outer_optimizer": diloco()},
            "topk2bit": {"outer_optimizer": diloco(), "compression": topk(0.25, bits=2, chunk=64)}}


def _rounds_at_4_and_12(step: int) -> int:
    """The schedule a run whose round at step 8 was undone must equal: rounds at 4 and 12 only."""
    return 4 if step < 4 else 8


def _round_at_4_only(step: int) -> int:
    return 4 if step < 4 else 100


def _train(method: str, replica: int, process_group, before_round=None, after_round=None, attach=None,
           k: Any = K, steps: int = STEPS, die_at: int | None = None) -> list[list[float]]:
    from localsgd_optim import LocalSGDOptimizer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=k, process_group=process_group,
                            **_methods()[method])
    if attach is not None:
        attach(opt)
    g = torch.Generator().manual_seed(100 + replica)
    for step in range(1, steps + 1):
        x, y = torch.randn(4, 8, generator=g), torch.randn(4, 2, generator=g)
        if step == die_at:
            os._exit(0)  # the host is gone, mid-period
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if step % K == 0 and before_round is not None:
            before_round()
        opt.step()
        if step % K == 0 and after_round is not None:
            after_round()
    return [p.detach().flatten().tolist() for p in model.parameters()]


def _plain_path(methods: list[str], k: Any = K, steps: int = STEPS):
    return {m: _train(m, dist.get_rank(), None, k=k, steps=steps) for m in methods}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replica_group(replica: int, lighthouse: str, groups: int, methods: list[str], out, mode: str = "by hand",
                   ready=None) -> None:
    from torchft import Manager, ProcessGroupGloo

    torch.set_num_threads(1)
    port = _free_port()
    store = dist.TCPStore("127.0.0.1", port, 1, True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)  # this replica group's own world
    pg = ProcessGroupGloo(timeout=timedelta(seconds=30))
    manager = Manager(pg=pg, min_replica_size=1 if mode == "kill" else groups,
                      load_state_dict=lambda state: None, state_dict=lambda: {},
                      use_async_quorum=False, lighthouse_addr=lighthouse, replica_id=f"replica{replica}",
                      store_addr="127.0.0.1", store_port=port, rank=0, world_size=1, timeout=timedelta(seconds=30))
    try:
        if ready is not None:  # every group heartbeats before any asks for a quorum: the first one has them all
            ready.wait()
            time.sleep(0.3)
        manager.start_quorum()
        if manager.num_participants() != groups:  # (a slow group missed the first quorum: say so)
            raise RuntimeError(f"the first quorum has {manager.num_participants()} of {groups} groups")
        pg.register("torchft")
        commits: list[bool] = []
        rank = manager.participating_rank()
        if mode == "by hand":
            result = {m: _train(m, rank, pg, manager.start_quorum, lambda: commits.append(manager.should_commit()))
                      for m in methods}
        else:
            from localsgd_optim.ft import Managed

            quorum = manager.start_quorum
            if mode == "undo round 2" and replica == 1:  # this group fails in the second round of each run
                calls = [0]

                def start_quorum(**kwargs: Any) -> None:
                    quorum(**kwargs)
                    calls[0] += 1
                    if calls[0] % 3 == 2:
                        manager.report_error(RuntimeError("injected: this group's round failed"))
                manager.start_quorum = start_quorum
            result = {}
            for m in methods:
                managed: list[Any] = []
                result[m] = _train(m, rank, pg, attach=lambda opt: managed.append(Managed(opt, manager)),
                                   steps=STEPS if mode == "managed" else 12,
                                   die_at=6 if mode == "kill" and replica == 1 else None)
                commits += [managed[0].rounds_committed, managed[0].rounds_rolled_back]
            commits.append(manager.current_step())  # torchft's own count of committed rounds
        out.put((replica, rank, result, commits))
    finally:
        manager.shutdown(wait=False)


def _run_groups(groups: int, methods: list[str], mode: str, survivors: int | None = None) -> list[Any]:
    from torchft._torchft import LighthouseServer

    kill = mode == "kill"
    lighthouse = LighthouseServer(bind="[::]:0", min_replicas=1 if kill else groups, join_timeout_ms=10000,
                                  quorum_tick_ms=100, heartbeat_timeout_ms=2000 if kill else None)
    ctx = mp.get_context("spawn")
    out, ready = ctx.Queue(), ctx.Barrier(groups) if kill else None
    procs = [ctx.Process(target=_replica_group, args=(r, lighthouse.address(), groups, methods, out, mode, ready))
             for r in range(groups)]
    try:
        for p in procs:
            p.start()
        results = [out.get(timeout=120) for _ in range(groups if survivors is None else survivors)]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        lighthouse.shutdown()
    return results


@pytest.mark.parametrize("groups", [3])  # (2 groups: through Managed below)
def test_healthy_rounds_on_torchft_groups_equal_the_plain_path(groups, request):
    methods = list(_methods())
    plain = request.getfixturevalue(f"ranks{groups}")(_plain_path, methods)
    results = _run_groups(groups, methods, "by hand")
    rounds = len(methods) * STEPS // K
    for replica, rank, result, commits in results:
        assert commits == [True] * rounds, (replica, commits)
        for method in methods:  # the replica's data is seeded by its quorum rank, as the plain path's by its rank
            assert result[method] == plain[rank][method], f"{method}: replica {replica} (quorum rank {rank})"


def test_managed_rounds_equal_the_plain_path(ranks2):
    """``Managed`` does the quorum and the vote itself: the same numbers as the plain path, every round kept."""
    methods = list(_methods())
    plain = ranks2(_plain_path, methods)
    for replica, rank, result, counts in _run_groups(2, methods, "managed"):
        assert counts == [STEPS // K, 0] * len(methods) + [len(methods) * STEPS // K], (replica, counts)
        for method in methods:
            assert result[method] == plain[rank][method], f"{method}: replica {replica}"


def test_a_round_one_group_votes_against_is_undone_on_every_participant(ranks2):
    """Group 1 fails in the round of step 8. torchft's vote is per group, so group 0 alone would keep
    it; ``Managed`` undoes it on both, and torchft's step counts stay equal. Oracle: the plain path
    with rounds at steps 4 and 12 only, bit for bit, DiLoCo's global copy and momentum and top-k's
    residuals included (they decide the round at 12)."""
    methods = ["plain", "diloco", "topk2bit"]
    plain = ranks2(_plain_path, methods, _rounds_at_4_and_12, 12)
    for replica, rank, result, counts in _run_groups(2, methods, "undo round 2"):
        assert counts == [2, 1] * len(methods) + [2 * len(methods)], (replica, counts)
        for method in methods:
            assert result[method] == plain[rank][method], f"{method}: replica {replica}"


def test_a_group_lost_mid_period_leaves_the_survivor_training(ranks2):
    """Group 1 dies at step 6. Group 0's round at step 8 waits for the lighthouse to drop it (heartbeat
    timeout 2 s), binds to the quorum of one, and trains on: every round kept, no step redone. Oracle for
    plain averaging: the plain path that averages at step 4 only (a round alone changes nothing)."""
    plain = ranks2(_plain_path, ["plain"], _round_at_4_only, 12)
    [(replica, rank, result, counts)] = _run_groups(2, ["plain"], "kill", survivors=1)
    assert replica == 0 and counts == [3, 0, 3]
    assert result["plain"] == plain[rank]["plain"]
