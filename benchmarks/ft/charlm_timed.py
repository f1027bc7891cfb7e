"""``examples/train_charlm.py``, unchanged, with the study's step log and collective count.

    python benchmarks/ft/charlm_timed.py --step-log DIR [train_charlm.py's arguments]

Works alone (``--ft``: one process per replica group) and as torchrun's worker (``--elastic``).
It wraps, in this process only: ``LocalSGDOptimizer.step`` (a record after every step: the step
count and, under torchft, the rounds committed and undone and the heals), ``Managed.start`` (a
``joined`` record: a returning group heals and joins a round there) and torchft's
``ProcessGroupGloo`` (every collective counted). The replica group's number is
``$STUDY_HOST`` (the restart path's host) or ``$REPLICA_GROUP_ID``.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "examples")]

import torch.distributed as dist  # noqa: E402
import torchft  # noqa: E402
import train_charlm  # noqa: E402

from localsgd_optim import LocalSGDOptimizer  # noqa: E402
from localsgd_optim.ft import Managed  # noqa: E402
from probes import StepLog, counting  # noqa: E402


def counters(managed: Any) -> tuple[int | None, int | None, int]:
    """(rounds committed, rounds undone, heals) under torchft; nothing to count on the restart path."""
    if managed is None:
        return None, None, 0
    return managed.rounds_committed, managed.rounds_rolled_back, len(managed.heals)


def install(log: StepLog) -> None:
    """Log every step and the join, and count torchft's collectives (this process only)."""
    step, start = LocalSGDOptimizer.step, Managed.start

    def logged_step(self: LocalSGDOptimizer, *args: Any, **kwargs: Any) -> Any:
        out = step(self, *args, **kwargs)
        log.step(self.num_steps, *counters(self.managed))
        return out

    def logged_start(self: Managed) -> int:
        at = start(self)
        log.step(at, *counters(self), kind="joined")
        return at

    LocalSGDOptimizer.step, Managed.start = logged_step, logged_start
    torchft.ProcessGroupGloo = counting(torchft.ProcessGroupGloo)  # train_charlm imports it at call time


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--step-log", required=True, metavar="DIR", help="where this process's records go")
    ours, rest = p.parse_known_args(argv)
    group = int(os.environ.get("STUDY_HOST", os.environ.get("REPLICA_GROUP_ID", 0)))
    install(StepLog(ours.step_log, group, int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))))
    train_charlm.main(rest)
    gc.collect()  # (the same teardown as train_charlm.py's own __main__)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
