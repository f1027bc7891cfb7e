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
import socket
from datetime import timedelta

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


def _train(method: str, replica: int, process_group, before_round=None, after_round=None) -> list[list[float]]:
    from localsgd_optim import LocalSGDOptimizer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=K, process_group=process_group,
                            **_methods()[method])
    g = torch.Generator().manual_seed(100 + replica)
    for step in range(1, STEPS + 1):
        x, y = torch.randn(4, 8, generator=g), torch.randn(4, 2, generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if step % K == 0 and before_round is not None:
            before_round()
        opt.step()
        if step % K == 0 and after_round is not None:
            after_round()
    return [p.detach().flatten().tolist() for p in model.parameters()]


def _plain_path(methods: list[str]):
    return {m: _train(m, dist.get_rank(), None) for m in methods}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replica_group(replica: int, lighthouse: str, groups: int, methods: list[str], out) -> None:
    from torchft import Manager, ProcessGroupGloo

    torch.set_num_threads(1)
    port = _free_port()
    store = dist.TCPStore("127.0.0.1", port, 1, True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)  # this replica group's own world
    pg = ProcessGroupGloo(timeout=timedelta(seconds=30))
    manager = Manager(pg=pg, min_replica_size=groups, load_state_dict=lambda state: None, state_dict=lambda: {},
                      use_async_quorum=False, lighthouse_addr=lighthouse, replica_id=f"replica{replica}",
                      store_addr="127.0.0.1", store_port=port, rank=0, world_size=1, timeout=timedelta(seconds=30))
    try:
        manager.start_quorum()
        pg.register("torchft")
        commits: list[bool] = []
        result = {m: _train(m, manager.participating_rank(), pg, manager.start_quorum,
                            lambda: commits.append(manager.should_commit())) for m in methods}
        out.put((replica, manager.participating_rank(), result, commits))
    finally:
        manager.shutdown(wait=False)


@pytest.mark.parametrize("groups", [2, 3])
def test_healthy_rounds_on_torchft_groups_equal_the_plain_path(groups, request):
    from torchft._torchft import LighthouseServer

    methods = list(_methods())
    plain = request.getfixturevalue(f"ranks{groups}")(_plain_path, methods)
    lighthouse = LighthouseServer(bind="[::]:0", min_replicas=groups, join_timeout_ms=10000)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_replica_group, args=(r, lighthouse.address(), groups, methods, out))
             for r in range(groups)]
    try:
        for p in procs:
            p.start()
        results = [out.get(timeout=120) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        lighthouse.shutdown()
    rounds = len(methods) * STEPS // K
    for replica, rank, result, commits in results:
        assert commits == [True] * rounds, (replica, commits)
        for method in methods:  # the replica's data is seeded by its quorum rank, as the plain path's by its rank
            assert result[method] == plain[rank][method], f"{method}: replica {replica} (quorum rank {rank})"
