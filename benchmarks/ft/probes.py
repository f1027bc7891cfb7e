"""What the study's drivers record: one JSON line per step (and per event) in a file of their own,
and every collective that a torchft process group runs.

Both drivers (``charlm_timed.py`` for ``examples/train_charlm.py``, ``torchft_diloco.py`` for
torchft's own DiLoCo) write the same records, which ``live_membership.py`` reads:

* ``{"kind": "begin", "t", "pid", "group", "rank", "world"}``: once, when the process starts;
* ``{"kind": "step", "t", "step", "commits", "rollbacks", "heals", "collectives"}``: after each
  optimizer step (``t`` is ``time.time()``; ``step`` the global step count after it; the counters
  are cumulative for this process);
* ``{"kind": "joined", ...}``: the same fields, when our ``Managed.start()`` returns (a returning
  replica group heals and joins a round there, before its first step).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["CALLS", "StepLog", "counting", "COLLECTIVES"]

#: the collective entry points of torchft's process groups (``torchft/process_group.py``)
COLLECTIVES = ("allgather", "allgather_into_tensor_coalesced", "allreduce", "allreduce_coalesced",
               "alltoall_base", "barrier", "broadcast", "reduce_scatter", "reduce_scatter_tensor_coalesced",
               "send", "recv")

#: collectives issued by this process so far, by name
CALLS: Counter = Counter()


def counting(base: type) -> type:
    """A subclass of the process group class ``base`` that counts each collective call in ``CALLS``.

    ``torch.distributed``'s functions and torchft's ``Manager`` both call these methods on the
    group object, so every collective of a round is counted, whoever issues it.
    """

    def wrap(name: str) -> Any:
        method = getattr(base, name)

        def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
            CALLS[name] += 1
            return method(self, *args, **kwargs)

        counted.__name__ = name
        return counted

    return type(f"Counting{base.__name__}", (base,),
                {name: wrap(name) for name in COLLECTIVES if hasattr(base, name)})


class StepLog:
    """Appends this process's records to ``directory/<pid>.jsonl``, one flushed line each."""

    def __init__(self, directory: str | os.PathLike, group: int, rank: int = 0, world: int = 1) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        self._file = open(Path(directory) / f"{os.getpid()}.jsonl", "a", buffering=1)
        self.write("begin", pid=os.getpid(), group=group, rank=rank, world=world)

    def write(self, kind: str, **fields: Any) -> None:
        self._file.write(json.dumps({"kind": kind, "t": time.time(), **fields}) + "\n")

    def step(self, step: int, commits: int | None = None, rollbacks: int | None = None, heals: int = 0,
             kind: str = "step") -> None:
        self.write(kind, step=step, commits=commits, rollbacks=rollbacks, heals=heals,
                   collectives=sum(CALLS.values()))
