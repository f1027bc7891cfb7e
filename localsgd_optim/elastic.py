"""Hosts that come and go: round-boundary checkpoints that are asynchronous, durable, and resume at any size.

Local SGD's replicas only agree at a round, and a restart at another world size has to start
from one state. :class:`ElasticCheckpoint` keeps that state on disk:

- :meth:`~ElasticCheckpoint.save` (call it right after a round) snapshots this rank's state in
  memory (its state dicts, or a sharded model's :func:`~localsgd_optim.checkpoint.rank_state`;
  the only time training waits) and writes it from a background thread into
  ``<dir>/step-<S>.world-<W>/rank<r>.<attempt>.pt``: a temporary file, ``fsync``, ``os.replace``,
  then an ``fsync`` of the directory, so a file that exists under its final name is whole and on
  disk, even after a power cut;
- a checkpoint step counts only once all ``W`` ranks' files **of one attempt** are there. The
  attempt is a token every rank of one run of the job shares (drawn by rank 0 at the first save
  or resume), so an earlier attempt's leftovers can never complete a step with this attempt's
  files: a step that two attempts each finished half of is incomplete, and
  :meth:`~ElasticCheckpoint.resume` skips it;
- each :meth:`~ElasticCheckpoint.save` first settles the previous one: this rank waits for its
  own write, and the ranks agree (one small all-reduce) that every write succeeded and that every
  ``extra`` can be loaded back; if not, every rank raises, not only the one whose disk failed;
- the writer is not a daemon: a process that ends without :meth:`~ElasticCheckpoint.close` (an
  exception out of the training loop, say) still finishes its last write before it exits;
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

import errno
import io
import os
import re
import secrets
import shutil
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from . import checkpoint
from .optimizer import LocalSGDOptimizer

__all__ = ["ElasticCheckpoint", "Resumed", "Step", "complete_steps"]

_STEP_DIR = re.compile(r"^step-(\d+)\.world-(\d+)$")
# rank<r>.<attempt>.pt; rank<r>.pt is a checkpoint written before attempts were named (attempt "")
_RANK_FILE = re.compile(r"^rank(\d+)(?:\.([0-9a-f]+-[0-9a-f]+))?\.pt$")


@dataclass(frozen=True)
class Resumed:
    """What :meth:`ElasticCheckpoint.resume` loaded.

    Attributes:
        step: the step the checkpoint was saved at.
        saved_world: ranks that saved it.
        world: ranks resuming from it.
        extra: the ``extra`` given to :meth:`ElasticCheckpoint.save` (this rank's, or rank 0's
            after a consolidation: RNG states differ per rank, positions do not).
        attempt: the attempt that wrote the step (``""`` for files written before attempts were named).
    """

    step: int
    saved_world: int
    world: int
    extra: Any
    attempt: str = ""

    @property
    def consolidated(self) -> bool:
        return self.saved_world != self.world

    @property
    def message(self) -> str:
        if self.consolidated:
            return f"resumed at step {self.step}: world {self.saved_world} -> {self.world}, consolidated"
        return f"resumed at step {self.step}: world {self.world}, each rank its own state"


class Step(NamedTuple):
    """A complete checkpoint step: every rank's file of one attempt is there."""

    step: int
    world: int
    path: Path
    attempt: str

    def file(self, rank: int) -> Path:
        return self.path / _file_name(rank, self.attempt)


def _file_name(rank: int, attempt: str) -> str:
    return f"rank{rank}.{attempt}.pt" if attempt else f"rank{rank}.pt"


def complete_steps(directory: str | os.PathLike) -> list[Step]:
    """Every checkpoint step some attempt finished on all its ranks, newest first.

    A step directory may hold files of several attempts (a run killed mid-save, then restarted
    and killed again): it counts only with ranks ``0 .. W-1`` all written by one attempt, and then
    as that attempt's (the newest such, if several are).
    """
    root = Path(directory)
    found = []
    if root.is_dir():
        for entry in root.iterdir():
            m = _STEP_DIR.match(entry.name)
            if not (m and entry.is_dir()):
                continue
            step, world = int(m.group(1)), int(m.group(2))
            ranks_of: dict[str, set[int]] = {}
            for f in entry.iterdir():
                fm = _RANK_FILE.match(f.name)
                if fm:
                    ranks_of.setdefault(fm.group(2) or "", set()).add(int(fm.group(1)))
            whole = [a for a, have in ranks_of.items() if have.issuperset(range(world))]
            if whole:
                found.append(Step(step, world, entry, max(whole)))
    return sorted(found, key=lambda s: (s.step, s.world), reverse=True)


def _fsync_dir(path: Path) -> None:
    """Make a directory's entries durable, where the platform can (not Windows; some network filesystems refuse)."""
    if os.name == "nt":  # a directory cannot be opened there; NTFS journals its metadata
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


def _unloadable(extra: Any, path: str = "extra") -> str | None:
    """The first entry of ``extra`` that ``torch.load(weights_only=True)`` cannot read back, or ``None``."""
    try:
        buf = io.BytesIO()
        torch.save(extra, buf)
        buf.seek(0)
        torch.load(buf, map_location="cpu", weights_only=True)
        return None
    except BaseException as e:  # noqa: BLE001 - narrowed to the entry below; never raised (every rank must agree)
        first = (str(e).splitlines() or [repr(e)])[0]
        problem = f"{path} ({type(extra).__name__}: {first[:200]})"
    if isinstance(extra, dict):
        items = [(f"{path}[{k!r}]", v) for k, v in extra.items()]
    elif isinstance(extra, (list, tuple)):
        items = [(f"{path}[{i}]", v) for i, v in enumerate(extra)]
    else:
        return problem
    for where, value in items:
        inner = _unloadable(value, where)
        if inner is not None:
            return inner
    return problem


class ElasticCheckpoint:
    """Asynchronous, durable per-rank checkpoints that resume at any world size.

    Args:
        directory: where the checkpoint steps live (shared by every rank: a shared filesystem
            when the ranks are on several hosts).
        keep: complete steps kept; older ones are deleted by rank 0 when a newer one is complete.
        shards: ranks per sharded replica (FSDP2, tensor parallel; ``1`` for plain replicas): a
            resize consolidates only the saved ranks that held the same shard.

    Every rank must make the same calls in the same order: :meth:`resume` and :meth:`save` are
    collectives when a process group is initialized. It is a context manager: leaving the block
    finishes the last write.

    Example::

        with ElasticCheckpoint("ck") as ckpt:
            resumed = ckpt.resume(model, opt)           # None on a fresh start
            start = resumed.step if resumed else 0
            for step in range(start + 1, steps + 1):
                ...; opt.step()
                if step % opt.k == 0:                   # right after a round
                    ckpt.save(step, model, opt, extra={"position": position})
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 2, shards: int = 1) -> None:
        if not (isinstance(keep, int) and keep >= 1):
            raise ValueError(f"keep must be an integer >= 1 (complete steps kept), got {keep!r}")
        self.directory = Path(directory)
        self.keep = keep
        self.shards = shards
        self._attempt: str | None = None
        self._writer: threading.Thread | None = None
        self._writing_step: int | None = None
        self._error: BaseException | None = None
        #: optimizer -> the handle of its step pre-hook (weak: an optimizer freed is forgotten, not its id reused)
        self._hooked: weakref.WeakKeyDictionary[LocalSGDOptimizer, Any] = weakref.WeakKeyDictionary()
        #: fault injection for tests: called with "before_tmp", "after_tmp" (written and fsync'd, not
        #: renamed), "after_rename" (renamed, directory fsync'd) and "retention" (rank 0, between deletions)
        self._fault: Callable[[str], None] | None = None
        #: seconds training waited in :meth:`save` (the snapshot), per save
        self.stalls: list[float] = []

    @staticmethod
    def _rank_world() -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    @property
    def attempt(self) -> str | None:
        """This run's token, the same on every rank: rank 0's clock (ms, hex) and a random part.

        Drawn by rank 0 at the first :meth:`save` or :meth:`resume` (``None`` before), and sent to
        the others there.
        """
        return self._attempt

    def _world_device(self, optimizer: LocalSGDOptimizer) -> torch.device:
        """Where a tensor of a collective on the default group lives: a GPU on NCCL, else the CPU."""
        if dist.get_backend() == "nccl":
            device = optimizer.join_device
            return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _from_rank0(self, optimizer: LocalSGDOptimizer, values: list[Any]) -> list[Any]:
        """``values`` as rank 0 has them (a broadcast on the default group, when there is one)."""
        if self._rank_world()[1] > 1:
            dist.broadcast_object_list(values, src=0, device=self._world_device(optimizer))
        return values

    @staticmethod
    def _new_attempt() -> str:
        return f"{time.time_ns() // 1_000_000:x}-{secrets.token_hex(4)}"

    # -- resume -------------------------------------------------------------------------------------

    def resume(self, model: nn.Module, optimizer: LocalSGDOptimizer,
               load_extra: Callable[[Any], None] | None = None) -> Resumed | None:
        """Load the newest complete checkpoint step, consolidated if the world size changed.

        Every rank must call it: it is a collective. Each rank first finishes its own write in
        flight (a failed one raises on every rank); then rank 0 chooses the step and every rank
        loads that one, whatever its own view of a shared filesystem says. Returns ``None`` when
        there is no complete step yet (a fresh start).
        """
        self._agree(optimizer, None, self._finish(), None)
        rank, world = self._rank_world()
        newest = None
        if rank == 0:
            steps = complete_steps(self.directory)
            newest = steps[0] if steps else None
        token, found = self._from_rank0(optimizer, [self._attempt or self._new_attempt(), newest])
        self._attempt = token
        if found is None:
            return None
        state, _ = checkpoint.load_per_rank(found.file, rank, world, self.shards, saved_world=found.world)
        train = state["train"]
        if "opt" in train:  # an unsharded model's plain state dicts (see save)
            model.load_state_dict(train["model"])
            optimizer.load_state_dict(train["opt"])
        else:
            checkpoint.load_rank_state(model, optimizer, train)
        if load_extra is not None:
            load_extra(state.get("extra"))
        return Resumed(step=found.step, saved_world=found.world, world=world, extra=state.get("extra"),
                       attempt=found.attempt)

    # -- save ---------------------------------------------------------------------------------------

    def save(self, step: int, model: nn.Module, optimizer: LocalSGDOptimizer, extra: Any = None,
             blocking: bool = False) -> None:
        """Snapshot this rank's state now and write it in the background (``blocking``: now).

        Call it on every rank at the same step, right after a round. Training waits for the
        in-memory copy, for this rank's previous write if it is still running, and for one small
        all-reduce in which the ranks agree that every previous write succeeded and that every
        ``extra`` loads with ``torch.load(weights_only=True)`` (tensors, numbers, strings, and
        dicts, lists and tuples of them). If not, every rank raises, before anything is written.
        With ``blocking`` the write is done, and agreed on, before it returns.
        """
        start = time.perf_counter()
        if self._attempt is None:
            self._attempt = self._from_rank0(optimizer, [self._new_attempt()])[0]
        attempt = self._attempt
        if optimizer not in self._hooked:  # the next round waits for this write (see _before_step)
            self._hooked[optimizer] = optimizer.register_step_pre_hook(self._before_step)
        failed = self._finish()
        bad_extra = _unloadable(extra)
        self._agree(optimizer, step, failed, bad_extra)
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
        self._writing_step = int(step)
        if blocking:
            self._write_safely(snapshot, target, rank, attempt)
            self._agree(optimizer, step, self._finish(), None)
            return
        # not a daemon: the interpreter finishes the write before the process exits
        self._writer = threading.Thread(target=self._write_safely, args=(snapshot, target, rank, attempt),
                                        name=f"localsgd-ckpt-{step}", daemon=False)
        self._writer.start()

    def _before_step(self, optimizer: LocalSGDOptimizer, args: Any, kwargs: Any) -> None:
        """Before a step that runs a global round: finish this rank's write in flight first.

        A round completes only once every rank is in it, so when round ``S + k`` is done, every
        rank's write of step ``S`` is on disk: a crash at any moment loses at most one round. A
        write that takes less than a period (the usual case) costs nothing here; its error waits
        for the agreement in the next :meth:`save`.
        """
        if self._writer is not None and optimizer._cursor.may_round_next():
            self._writer.join()
            self._writer = None

    def _finish(self) -> BaseException | None:
        """Wait for this rank's write in flight; its error (taken), if it failed."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        error, self._error = self._error, None
        return error

    def _agree(self, optimizer: LocalSGDOptimizer, step: int | None, failed: BaseException | None,
               bad_extra: str | None) -> None:
        """Raise on every rank if any rank's last write failed or its ``extra`` cannot be loaded back."""
        rank, world = self._rank_world()
        flags = torch.zeros(2 * world, dtype=torch.int32)
        flags[2 * rank], flags[2 * rank + 1] = failed is not None, bad_extra is not None
        if world > 1:
            flags = flags.to(self._world_device(optimizer))
            dist.all_reduce(flags)
            flags = flags.cpu()
        write_failed = [r for r in range(world) if flags[2 * r]]
        extra_bad = [r for r in range(world) if flags[2 * r + 1]]
        if write_failed:
            mine = f": {type(failed).__name__}: {failed}" if failed is not None else " (see that rank's error)"
            raise RuntimeError(
                f"ElasticCheckpoint: writing the checkpoint of step {self._writing_step} failed on rank(s) "
                f"{write_failed}{mine}. That step is incomplete and a restart resumes from the one before; "
                f"check the disk under {self.directory} (space, permissions) on those hosts"
            ) from failed
        if extra_bad:
            mine = f": {bad_extra}" if bad_extra is not None else " (see that rank's error)"
            raise ValueError(
                f"ElasticCheckpoint.save(step={step}, extra=...): rank(s) {extra_bad} passed an extra that "
                f"torch.load(weights_only=True) cannot read back{mine}. Pass tensors, numbers, strings and "
                "dicts, lists or tuples of them: e.g. torch.from_numpy(a) for an array, int(x) or float(x) for "
                "a NumPy scalar, str(path) for a Path"
            )

    def _write_safely(self, snapshot: Any, target: Path, rank: int, attempt: str) -> None:
        try:
            self._write(snapshot, target, rank, attempt)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread
            self._error = e
            if threading.current_thread() is not threading.main_thread():  # nobody may be left to raise it
                print(f"ElasticCheckpoint: rank {rank}: writing {target} failed: {e!r}", file=sys.stderr, flush=True)

    def _write(self, snapshot: Any, target: Path, rank: int, attempt: str) -> None:
        fault = self._fault or (lambda point: None)
        if rank == 0:  # every rank's previous write is complete (agreed in save): older steps can go
            self._prune(fault)
        fault("before_tmp")
        if not target.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            _fsync_dir(target.parent)  # the step's directory entry is durable too
        tmp = target / f".{_file_name(rank, attempt)}.tmp"
        with open(tmp, "wb") as f:
            torch.save(snapshot, f)
            f.flush()
            os.fsync(f.fileno())
        fault("after_tmp")
        os.replace(tmp, target / _file_name(rank, attempt))  # atomic: a reader sees all of it or nothing
        _fsync_dir(target)  # ... and the rename survives a power cut
        fault("after_rename")

    def _prune(self, fault: Callable[[str], None]) -> None:
        """Delete the steps older than the ``keep`` newest complete ones (never a newer, unfinished one).

        Rank 0 does it as its next write starts: by then every rank's previous write has finished
        (agreed in :meth:`save`), so what is deleted does not depend on which rank wrote faster.
        """
        steps = complete_steps(self.directory)
        if len(steps) < self.keep:
            return
        oldest_kept = steps[self.keep - 1].step
        for entry in sorted(self.directory.iterdir()):
            m = _STEP_DIR.match(entry.name)
            if m and int(m.group(1)) < oldest_kept:
                shutil.rmtree(entry, ignore_errors=True)
                fault("retention")

    def wait(self) -> None:
        """Wait for this rank's write in flight, if any; raise its error if it failed (this rank only)."""
        error = self._finish()
        if error is not None:
            raise RuntimeError(f"ElasticCheckpoint: writing the checkpoint of step {self._writing_step} "
                               f"failed: {error}") from error

    def close(self) -> None:
        """Finish the last write (leaving a ``with`` block does it; so does a normal interpreter exit)."""
        for handle in self._hooked.values():
            handle.remove()
        self._hooked.clear()
        self.wait()

    def __deepcopy__(self, memo: dict[int, Any]) -> ElasticCheckpoint:
        # An optimizer's step pre-hook holds this object: a deepcopy of the optimizer shares it (its
        # writer thread cannot be copied, and two objects must not write the same files).
        return self

    def __enter__(self) -> ElasticCheckpoint:
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.close()
        else:  # already failing: finish the write, and let the first error through
            self._finish()
