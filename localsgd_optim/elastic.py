"""Hosts that come and go: round-boundary checkpoints that are asynchronous, atomic, and resume at any size.

Local SGD's replicas only agree at a round, and a restart at another world size has to start
from one state. :class:`ElasticCheckpoint` keeps that state on disk:

- :meth:`~ElasticCheckpoint.save` (call it right after a round) snapshots this rank's state in
  memory (its state dicts, or a sharded model's :func:`~localsgd_optim.checkpoint.rank_state`;
  the only time training waits) and writes it from a background thread, into
  ``<dir>/step-<S>.world-<W>/rank<r>.pt`` through a temporary file and ``os.replace``. A
  checkpoint step counts only once all ``W`` ranks' files are there, so a host killed
  mid-save leaves an incomplete step that :meth:`~ElasticCheckpoint.resume` skips;
- :meth:`~ElasticCheckpoint.resume` finds the newest complete step. At the same world size
  each rank loads its own file (bit for bit); at another, each rank loads the average of the
  saved ranks that held its shard (:func:`localsgd_optim.checkpoint.consolidate`, with the
  rules of ``docs/failure-modes.md``), and says what happened:
  ``resumed at step 80: world 2 -> 1, consolidated``.

Pair it with torchrun's elastic agent (``--nnodes MIN:MAX --rdzv-backend c10d
--max-restarts N``); on torch 2.13 also set ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, without
which a job cannot grow (see ``docs/failure-modes.md``). ``examples/train_charlm.py
--ckpt-dir D --elastic`` is the recipe end to end.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from . import checkpoint
from .optimizer import LocalSGDOptimizer

__all__ = ["ElasticCheckpoint", "Resumed", "complete_steps"]

_STEP_DIR = re.compile(r"^step-(\d+)\.world-(\d+)$")


@dataclass(frozen=True)
class Resumed:
    """What :meth:`ElasticCheckpoint.resume` loaded.

    Attributes:
        step: the step the checkpoint was saved at.
        saved_world: ranks that saved it.
        world: ranks resuming from it.
        extra: the ``extra`` given to :meth:`ElasticCheckpoint.save` (this rank's, or rank 0's
            after a consolidation: RNG states differ per rank, positions do not).
    """

    step: int
    saved_world: int
    world: int
    extra: Any

    @property
    def consolidated(self) -> bool:
        return self.saved_world != self.world

    @property
    def message(self) -> str:
        if self.consolidated:
            return f"resumed at step {self.step}: world {self.saved_world} -> {self.world}, consolidated"
        return f"resumed at step {self.step}: world {self.world}, each rank its own state"


def complete_steps(directory: str | os.PathLike) -> list[tuple[int, int, Path]]:
    """``(step, world, path)`` of every checkpoint step whose ranks all finished writing, newest first."""
    root = Path(directory)
    found = []
    if root.is_dir():
        for entry in root.iterdir():
            m = _STEP_DIR.match(entry.name)
            if m and entry.is_dir():
                step, world = int(m.group(1)), int(m.group(2))
                if all((entry / f"rank{r}.pt").exists() for r in range(world)):
                    found.append((step, world, entry))
    return sorted(found, key=lambda x: (x[0], x[1]), reverse=True)


class ElasticCheckpoint:
    """Asynchronous, atomic per-rank checkpoints that resume at any world size.

    Args:
        directory: where the checkpoint steps live (shared by every rank: a shared filesystem
            when the ranks are on several hosts).
        keep: complete steps kept; older ones are deleted by rank 0 when a newer one is complete.
        shards: ranks per sharded replica (FSDP2, tensor parallel; ``1`` for plain replicas): a
            resize consolidates only the saved ranks that held the same shard.

    Example::

        ckpt = ElasticCheckpoint("ck")
        resumed = ckpt.resume(model, opt)           # None on a fresh start
        start = resumed.step if resumed else 0
        for step in range(start + 1, steps + 1):
            ...; opt.step()
            if step % opt.k == 0:                   # right after a round
                ckpt.save(step, model, opt, extra={"position": position})
        ckpt.close()                                # waits for the last write
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 2, shards: int = 1) -> None:
        if not (isinstance(keep, int) and keep >= 1):
            raise ValueError(f"keep must be an integer >= 1 (complete steps kept), got {keep!r}")
        self.directory = Path(directory)
        self.keep = keep
        self.shards = shards
        self._writer: threading.Thread | None = None
        #: fault injection for tests: called between writing the temporary file and renaming it
        self._before_replace: Callable[[], None] | None = None
        self._error: BaseException | None = None
        #: seconds training waited in :meth:`save` (the snapshot), per save
        self.stalls: list[float] = []

    @staticmethod
    def _rank_world() -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    # -- resume -------------------------------------------------------------------------------------

    def resume(self, model: nn.Module, optimizer: LocalSGDOptimizer,
               load_extra: Callable[[Any], None] | None = None) -> Resumed | None:
        """Load the newest complete checkpoint step, consolidated if the world size changed.

        Every rank must call it (it may be a collective: see
        :func:`~localsgd_optim.checkpoint.load_rank_state`). Returns ``None`` when there is no
        complete step yet (a fresh start).
        """
        rank, world = self._rank_world()
        steps = complete_steps(self.directory)
        if not steps:
            return None
        step, saved_world, path = steps[0]
        state, _ = checkpoint.load_per_rank(lambda r: path / f"rank{r}.pt", rank, world, self.shards)
        train = state["train"]
        if "opt" in train:  # an unsharded model's plain state dicts (see save)
            model.load_state_dict(train["model"])
            optimizer.load_state_dict(train["opt"])
        else:
            checkpoint.load_rank_state(model, optimizer, train)
        if load_extra is not None:
            load_extra(state.get("extra"))
        return Resumed(step=step, saved_world=saved_world, world=world, extra=state.get("extra"))

    # -- save ---------------------------------------------------------------------------------------

    def save(self, step: int, model: nn.Module, optimizer: LocalSGDOptimizer, extra: Any = None,
             blocking: bool = False) -> None:
        """Snapshot this rank's state now and write it in the background (``blocking``: now).

        Call it on every rank at the same step, right after a round. Training waits only for the
        in-memory copy (and for the previous write, if it is still running). A failed write is
        raised at the next :meth:`save`, :meth:`wait` or :meth:`close`.
        """
        start = time.perf_counter()
        self.wait()
        rank, world = self._rank_world()
        # An unsharded model's own state dicts (0.3 ms for the main job's model); a sharded one's local
        # shards by parameter name (checkpoint.rank_state, through DCP's helpers: 5 ms there)
        train = {"model": model.state_dict(), "opt": optimizer.state_dict()} if optimizer._members.sharding is None \
            else checkpoint.rank_state(model, optimizer)
        state = {"step": int(step), "world_size": world, "train": train, "extra": extra}
        # the weights keep changing under training; the copy does not
        snapshot = checkpoint.map_tensors(state, lambda t: t.detach().to("cpu", copy=True))
        self.stalls.append(time.perf_counter() - start)
        target = self.directory / f"step-{int(step):08d}.world-{world}"
        if blocking:
            self._write(snapshot, target, rank)
            return
        self._writer = threading.Thread(target=self._write_safely, args=(snapshot, target, rank),
                                        name=f"localsgd-ckpt-{step}", daemon=True)
        self._writer.start()

    def _write_safely(self, snapshot: Any, target: Path, rank: int) -> None:
        try:
            self._write(snapshot, target, rank)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread
            self._error = e

    def _write(self, snapshot: Any, target: Path, rank: int) -> None:
        target.mkdir(parents=True, exist_ok=True)
        tmp = target / f".rank{rank}.pt.tmp"
        torch.save(snapshot, tmp)
        if self._before_replace is not None:
            self._before_replace()
        os.replace(tmp, target / f"rank{rank}.pt")  # atomic: a reader sees all of it or nothing
        if rank == 0:
            self._prune()

    def _prune(self) -> None:
        """Delete the steps older than the ``keep`` newest complete ones (never a newer, unfinished one)."""
        steps = complete_steps(self.directory)
        if len(steps) < self.keep:
            return
        oldest_kept = steps[self.keep - 1][0]
        for entry in self.directory.iterdir():
            m = _STEP_DIR.match(entry.name)
            if m and int(m.group(1)) < oldest_kept:
                shutil.rmtree(entry, ignore_errors=True)

    def wait(self) -> None:
        """Wait for the write in flight, if any; raise its error if it failed."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"ElasticCheckpoint: writing a checkpoint failed: {error}") from error

    def close(self) -> None:
        """Finish the last write (call it before the process exits)."""
        self.wait()

