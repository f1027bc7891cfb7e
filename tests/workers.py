"""A pool of real gloo processes, started once and reused by every distributed test.

Spawning a process that imports torch costs seconds; the suite runs dozens of
multi-rank tests, so each world size gets one long-lived pool. A test sends a
module-level function to every rank; each rank runs it with the default process
group initialized and returns its result (serialized with ``torch.save`` so tensors
come back bit for bit) or its traceback.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import socket
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch

RESULT_TIMEOUT_S = 180.0
PG_TIMEOUT_S = 60.0

# What every test process imports anyway. Spawned, each process imported them again (seconds each on
# 2 cores); forked from a forkserver that imported them once, it starts at once, still a new process
# with nothing of the test process in it (modules missing here, e.g. torchft, are skipped).
PRELOAD = ["torch", "torch.distributed", "torch.distributed.fsdp", "localsgd_optim", "helpers", "workers", "pytest",
           "torchft"]


def process_context() -> Any:
    """multiprocessing's "forkserver" context, its server preloaded with ``PRELOAD``."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # (no effect once the server runs: it is the same list everywhere)
    return ctx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _worker(rank: int, world_size: int, port: int, tasks: Any, results: Any) -> None:
    import torch.distributed as dist

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=PG_TIMEOUT_S),
    )
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, payload = task
        try:
            args = torch.load(io.BytesIO(payload), weights_only=False)
            results.put((rank, True, _dumps(fn(*args))))
        except BaseException:  # noqa: BLE001 - report everything to the test
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class RankError(AssertionError):
    """Raised in the test process when a function failed on one or more ranks."""


class WorkerPool:
    """``world_size`` processes in one gloo group, running test functions on demand."""

    def __init__(self, world_size: int) -> None:
        ctx = process_context()
        self.world_size = world_size
        port = _free_port()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(target=_worker, args=(r, world_size, port, self._tasks[r], self._results), daemon=True)
            for r in range(world_size)
        ]
        for p in self._procs:
            p.start()
        self.broken = False

    def run(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """Run ``fn(*args)`` on every rank; return the per-rank results in rank order."""
        # Serialized, not put as tensors: a queue would hand every rank the same shared-memory
        # tensors, and one rank's in-place update (an optimizer's loaded "step") would reach the others.
        payload = _dumps(args)
        for q in self._tasks:
            q.put((fn, payload))
        outcomes: dict[int, tuple[bool, Any]] = {}
        try:
            while len(outcomes) < self.world_size:
                rank, ok, payload = self._results.get(timeout=RESULT_TIMEOUT_S)
                outcomes[rank] = (ok, payload)
        except queue.Empty:
            self.close()
            raise RankError(
                f"{fn.__name__} did not finish on ranks "
                f"{sorted(set(range(self.world_size)) - set(outcomes))} within {RESULT_TIMEOUT_S}s"
            ) from None
        failures = {r: tb for r, (ok, tb) in outcomes.items() if not ok}
        if failures:
            raise RankError("\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items())))
        return [torch.load(io.BytesIO(outcomes[r][1]), weights_only=False) for r in range(self.world_size)]

    def close(self) -> None:
        self.broken = True
        for q in self._tasks:
            try:
                q.put(None)
            except Exception:  # noqa: BLE001
                pass
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
