"""Process-group plumbing: which group to use, and checks that all its ranks agree."""

from __future__ import annotations

import hashlib
import weakref
from enum import IntEnum
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "LocalSGDError",
    "LayoutMismatchError",
    "ScheduleMismatchError",
    "AveragingRoundError",
    "NonFiniteParameterError",
    "RoundKind",
    "group_size",
    "describe_tensor",
    "fingerprint",
    "check_ranks_agree",
    "agree_on_round",
    "PendingAgreement",
    "Share",
    "all_gather_into",
    "on_every_rank",
    "on_any_rank",
]


class RoundKind(IntEnum):
    """What a rank is doing when it enters the control collective (its value goes on the wire)."""

    BIND = 0
    SCHEDULED = 1
    SYNC = 2
    LOCAL = 3

    @property
    def description(self) -> str:
        return _ROUND_NAMES[self]


_ROUND_NAMES = {RoundKind.BIND: "binding to the process group", RoundKind.SCHEDULED: "a scheduled averaging round",
                RoundKind.SYNC: "an explicit sync()", RoundKind.LOCAL: "a local (within-group) averaging round"}


class LocalSGDError(RuntimeError):
    """Base class of the errors raised on every rank when ranks disagree."""


class LayoutMismatchError(LocalSGDError):
    """Ranks wrap different parameters or settings."""


class ScheduleMismatchError(LocalSGDError):
    """Ranks reached an averaging round at different step counts or for different reasons."""


class NonFiniteParameterError(LocalSGDError):
    """A rank holds NaN/Inf parameters at an averaging round; nothing was averaged."""


class AveragingRoundError(LocalSGDError):
    """A collective of an averaging round failed (a rank died, the network broke, a timeout)."""


def group_size(group: dist.ProcessGroup | None) -> int:
    """World size of ``group``, or 1 when torch.distributed is not initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    if dist.get_rank(group) < 0:
        raise ValueError(
            f"process_group does not contain this rank (global rank {dist.get_rank()}); "
            "construct LocalSGDOptimizer only on the ranks of its process_group"
        )
    return dist.get_world_size(group)


def describe_tensor(t: torch.Tensor) -> tuple[str, str, tuple[int, ...]]:
    return (t.device.type, str(t.dtype).removeprefix("torch."), tuple(t.shape))


def fingerprint(settings: dict[str, Any], layout: Sequence[tuple]) -> int:
    """A stable 63-bit digest of settings and layout (Python's ``hash`` differs per process)."""
    digest = hashlib.blake2b(repr((sorted(settings.items()), list(layout))).encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


def _fmt(entry: tuple | None, strides: bool = False) -> str:
    """``float32[2, 4] on cpu``; with ``strides`` (when only the memory order differs) also those."""
    if entry is None:
        return "missing"
    device, dtype, shape = entry[:3]
    text = f"{dtype}{list(shape)} on {device}"
    sharded = next((i for i, x in enumerate(entry) if x in ("dtensor", "fsdp1")), None)
    if strides and sharded is not None and len(entry) >= sharded + 3:  # which shard: see _sharded.describe
        if entry[sharded] == "dtensor" and len(entry) >= sharded + 4:
            _, placements, local, where = entry[sharded:sharded + 4]
            return f"{text}, {', '.join(placements)}, local shard {list(local)} at mesh coordinate {list(where)}"
        _, local, infos = entry[sharded:sharded + 3]
        return f"{text}, FSDP1 flat shard {list(local)} holding elements {infos} of its parameters"
    return text + (f" with strides {entry[3]}" if strides and len(entry) > 3 else "")


def check_ranks_agree(
    group: dist.ProcessGroup | None,
    settings: dict[str, Any],
    layout: Sequence[tuple],
    names: Sequence[str],
) -> None:
    """Gather every rank's settings and tensor layout; raise on every rank if any differ.

    One ``all_gather_object`` carries everything, so every rank sees every other
    rank's view and reaches the same verdict: the error is raised everywhere, never
    on one rank while the others wait in a collective. Ranks are numbered within
    ``group``.
    """
    mine = {"settings": dict(settings), "layout": list(layout), "names": list(names)}
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    ref = everyone[0]
    for rank, theirs in enumerate(everyone[1:], start=1):
        for key in ref["settings"]:
            if ref["settings"][key] != theirs["settings"].get(key):
                raise LayoutMismatchError(
                    f"LocalSGDOptimizer: ranks disagree on {key}: rank 0 has "
                    f"{ref['settings'][key]!r}, rank {rank} has {theirs['settings'].get(key)!r}. "
                    f"Pass the same {key} on every rank."
                )
        a, b = ref["layout"], theirs["layout"]
        if a == b:
            continue
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        # Name it from a rank that has it, so every rank prints the very same message.
        owner = ref if first < len(ref["names"]) else theirs
        name = owner["names"][first]
        x, y = (a[first] if first < len(a) else None), (b[first] if first < len(b) else None)
        strides = x is not None and y is not None and x[:3] == y[:3]  # only the memory order differs
        raise LayoutMismatchError(
            "LocalSGDOptimizer: ranks wrap different parameters "
            f"(rank 0 has {len(a)}, rank {rank} has {len(b)}); the first difference is "
            f"{name}: {_fmt(x, strides)} on rank 0, {_fmt(y, strides)} on rank {rank}. Build the model and "
            "optimizer identically on every rank (same modules, same parameter order, same "
            "add_param_group calls)."
        )


def agree_on_round(
    group: dist.ProcessGroup | None,
    device: torch.device,
    kind: RoundKind,
    num_steps: int,
    start_steps: int,
    digest: int,
    explain_layout: Any,
    nonfinite: int = -1,
    names: Any = tuple,
    joined: bool = False,
    local_error: BaseException | None = None,
    weight: int = -1,
    unit: str = "step",
) -> Share:
    """The control collective that opens every round: one tiny ``all_gather``, no data yet.

    Every rank contributes (kind, step count, step count it started or resumed from,
    layout digest, index of its first non-finite parameter or -1) and every rank checks
    the same gathered table, so a disagreement or a NaN raises on every rank before any
    parameter is touched. ``explain_layout()`` is called (on every rank) when the
    digests differ, to raise a readable error; ``names()`` gives parameter names for
    the NaN message (called only then, identically everywhere). A rank that has run out
    of data under :class:`~torch.distributed.algorithms.Join` says ``joined``.

    On torch's fake process group (backend ``"fake"``, from
    ``torch.testing._internal.distributed.fake_pg``; ``python -m localsgd_optim.bench
    --fake-world N`` uses it), collectives move nothing, so a gathered table would be
    garbage. A fake group has no peers: every rank is this one. The table is then this
    rank's own row repeated world-size times and no collective is issued; the row still
    goes to ``device`` and back, as with NCCL, and the verdict is the same code. Such a
    table always agrees with itself, so only this rank's own NaN or local error can raise.

    ``weight`` is the work this rank did since the last round (``step(tokens=)``; -1: not
    given): every rank gives one or none does, and a rank with weight 0 counts as joined (if
    every rank's is 0, none is weighted: the plain mean). ``unit`` names what ``num_steps`` counts in
    the errors: ``"step"``, or ``"round"`` when time-budgeted replicas share their round count instead.

    Returns:
        A :class:`Share`: without weights, or with equal ones, the number of ranks that send
        data (not joined; weight not 0 when weights are in effect); with different weights,
        their sum, each rank multiplying what it sends by its own.
    """
    return PendingAgreement(group, device, [kind, num_steps, start_steps, digest, nonfinite, int(joined),
                                            int(local_error is not None), weight],
                            explain_layout, names, local_error, unit).finish()


class PendingAgreement:
    """A control collective launched (asynchronously with ``async_op``): :meth:`finish` reads its verdict.

    An asynchronous round launches it and its data collectives back to back and reads the verdict
    when it lands, so no rank waits for another at the launch; every rank still reads the same
    table, so a disagreement raises on every rank (at the landing, before anything is applied).
    """

    __slots__ = ("_table", "_work", "_world", "_width", "_explain", "_names", "_error", "_unit", "_mine")

    def __init__(self, group: dist.ProcessGroup | None, device: torch.device, row: list[int], explain_layout: Any,
                 names: Any, local_error: BaseException | None, unit: str, async_op: bool = False) -> None:
        mine = self._mine = torch.tensor(row, dtype=torch.int64, device=device)  # (kept while in flight)
        self._world, self._width, self._work = dist.get_world_size(group), len(row), None
        self._explain, self._names, self._error, self._unit = explain_layout, names, local_error, unit
        if _is_fake(group):
            self._table = mine.cpu().repeat(self._world)
        else:
            self._table = mine.new_empty(self._world * len(row))  # one gather into one tensor: no per-rank outputs
            self._work = all_gather_into(self._table, mine, group, async_op=async_op)

    @property
    def failed(self) -> bool:
        """Whether this rank failed in its local preparation (its row says so)."""
        return self._error is not None

    def finish(self, prescaled: bool = False) -> Share:
        """Wait for the gather, then decide (raising on every rank alike). ``prescaled``: each rank
        multiplied what it sent by its weight before knowing the others' (an asynchronous round):
        the divisor is then the total weight even when the weights are equal."""
        work, self._work = self._work, None
        if work is not None and hasattr(work, "wait"):
            work.wait()
        flat, width = self._table.cpu().tolist(), self._width
        rows = [flat[r * width:(r + 1) * width] for r in range(self._world)]
        return _verdict(rows, self._explain, self._names, self._error, self._unit, prescaled)


def is_nccl(group: dist.ProcessGroup | None) -> bool:
    """Whether ``group`` runs on NCCL (its collectives need CUDA tensors): torch's backend, or a torchft
    group over NCCL (registered under a name of its own, so the backend's name does not say)."""
    return "NCCL" in type(group).__name__ or dist.get_backend(group) == "nccl"


def on_every_rank(ok: bool, group: dist.ProcessGroup | None, device: torch.device) -> bool:
    """Whether ``ok`` holds on every rank of ``group``: one ``MIN`` all-reduce of one int on ``device``."""
    flag = torch.tensor([int(ok)], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def on_any_rank(flag: bool, groups: Sequence[dist.ProcessGroup], device: torch.device) -> bool:
    """Whether ``flag`` holds on any rank of the groups' union, when every rank reaches every group
    through the others (a replica's mesh dimensions): one ``MAX`` all-reduce of one int per group."""
    value = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    for group in groups:
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value.item())


#: groups that have no tensor-form all-gather (torchft's reconfigurable groups: their wrapper has no
#: ``_allgather_base``), keyed by id: they are long-lived, and an id only ever skips one failed attempt
_LIST_GATHER: set[int] = set()


def all_gather_into(out: torch.Tensor, mine: torch.Tensor, group: dist.ProcessGroup | None,
                     async_op: bool = False) -> Any:
    """``all_gather_into_tensor`` under the name this torch prefers (2.13 deprecates the old one).

    A group without it (torchft's ``ProcessGroupGloo`` and ``ManagedProcessGroup`` raise "No
    backend type associated with device type") gets the list form into views of ``out``: the same
    bytes in the same places, one collective all the same.
    """
    if group is not None and id(group) in _LIST_GATHER:
        return dist.all_gather(list(out.view(-1, *mine.shape).unbind(0)), mine, group=group, async_op=async_op)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    try:
        return gather(out, mine, group=group, async_op=async_op)
    except RuntimeError as e:
        if group is None or "No backend type associated" not in str(e):
            raise
        _LIST_GATHER.add(id(group))
        return all_gather_into(out, mine, group, async_op)


#: groups whose place of this rank in their collectives torch does not know, and who says it
_RANKS: dict[int, Callable[[], int | None]] = {}


def rank_from(group: dist.ProcessGroup, rank: Callable[[], int | None]) -> None:
    """Say where this rank sits in ``group``'s collectives: a torchft group is, to torch, a world of one
    (``dist.get_rank`` gives 0 on every replica), its manager knows (see :class:`~localsgd_optim.ft.Managed`).
    Forgotten with the group (a later group at the same address must not inherit it)."""
    _RANKS[id(group)] = rank
    try:
        weakref.finalize(group, _RANKS.pop, id(group), None)
    except TypeError:  # a group that takes no weak reference lives as long as the process anyway
        pass


def group_rank(group: dist.ProcessGroup | None) -> int:
    """This rank's slot in ``group``'s collectives (an all-gather's order, an all-to-all's peer)."""
    rank = _RANKS[id(group)]() if group is not None and id(group) in _RANKS else None
    return dist.get_rank(group) if rank is None else rank


class Share(NamedTuple):
    """What the control collective decided about a round's mean (the same on every rank)."""

    divisor: int  #: ranks that send data, or (``weighted``) their total weight
    weighted: bool  #: each rank multiplies what it sends by its weight
    by_work: bool  #: weights are in effect: a rank whose weight is 0 sends nothing


def _is_fake(group: dist.ProcessGroup | None) -> bool:
    """Whether ``group`` is torch's fake process group (no peers, collectives move nothing)."""
    return dist.get_backend(group) == "fake"


def _verdict(rows: list[list[int]], explain_layout: Any, names: Any,
             local_error: BaseException | None, unit: str = "step", prescaled: bool = False) -> Share:
    """Every rank reads the same gathered table, so every rank reaches the same verdict."""
    kinds, steps, starts, digests, bad, joins, failed, weights = (list(col) for col in zip(*rows))
    if any(failed):
        # A rank failed in its local preparation (e.g. out of memory for the buffers): it raises
        # its own error, the others say which rank, and nobody waits in a data collective.
        if local_error is not None:
            raise local_error
        raise LocalSGDError(
            f"LocalSGDOptimizer: rank(s) {[r for r, f in enumerate(failed) if f]} failed while "
            f"preparing {_ROUND_NAMES[kinds[0]]} at {unit} {steps[0]}; see that rank's error. "
            "No parameter was changed."
        )
    if len(set(digests)) > 1:
        explain_layout()
        raise LayoutMismatchError(f"LocalSGDOptimizer: ranks wrap different parameters (digests {digests})")
    if len(set(starts)) > 1:
        raise ScheduleMismatchError(
            f"LocalSGDOptimizer: ranks resumed from different {unit} counts ({starts} per rank), so "
            "their averaging rounds are out of phase. Load the same checkpoint step on every rank."
        )
    if len(set(kinds)) > 1 or len(set(steps)) > 1:
        doing = "; ".join(f"rank {r}: {_ROUND_NAMES[k]} at {unit} {s}" for r, (k, s) in enumerate(zip(kinds, steps)))
        if unit == "round":
            raise ScheduleMismatchError(
                f"LocalSGDOptimizer: ranks are out of step ({doing}). With round_every_s, every rank must "
                "run the same number of rounds and call sync() at the same point: end training on "
                "opt.num_rounds, not on a step count.")
        raise ScheduleMismatchError(
            f"LocalSGDOptimizer: ranks are out of step ({doing}). Every rank must call step() the "
            "same number of times between averaging rounds and call sync() at the same point; "
            "give every rank the same number of batches (or use torch.distributed.algorithms.Join)."
        )
    culprits = [(r, i) for r, i in enumerate(bad) if i >= 0]
    if culprits:
        names = list(names())
        where = "; ".join(f"rank {r}: {names[i] if i < len(names) else f'parameter {i}'}" for r, i in culprits)
        raise NonFiniteParameterError(
            f"LocalSGDOptimizer: not averaging at {unit} {steps[0]}: NaN/Inf parameters ({where}). Every "
            "replica is left as it was, so the others are not poisoned. Restore from the last "
            "checkpoint and lower the learning rate, clip gradients or use GradScaler; or pass "
            "check_finite=False to average anyway."
        )
    given = [w >= 0 for w in weights]
    if any(given) and not all(given):
        raise ScheduleMismatchError(
            f"LocalSGDOptimizer: rank(s) {[r for r, g in enumerate(given) if g]} passed step(tokens=...) since the "
            f"last round at {unit} {steps[0]}, rank(s) {[r for r, g in enumerate(given) if not g]} did not: pass "
            "tokens= at every step on every rank, or on none")
    work = [0 if j else w for j, w in zip(joins, weights)] if all(given) else []
    if prescaled and all(given):  # each sent weight x value, whatever the others' weights: divide by the total
        return Share(sum(work), True, True)
    if not any(work):  # no weights, or no rank reported work: the plain mean over the ranks not joined
        return Share(len(joins) - sum(joins), False, False)
    sending = [w for w in work if w > 0]
    if len(set(sending)) == 1:  # equal weights: the plain mean over the ranks that did work
        return Share(len(sending), False, True)
    return Share(sum(sending), True, True)
