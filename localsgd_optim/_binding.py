"""Binding to a process group, and the control collective that opens every round."""

from __future__ import annotations

import contextlib
import itertools
import operator
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ._buckets import BucketEngine, bucket_cap_bytes
from ._sharded import named_params
from ._dist import (
    AveragingRoundError,
    LayoutMismatchError,
    LocalSGDError,
    PendingAgreement,
    RoundKind,
    Share,
    check_ranks_agree,
    describe_tensor,
    fingerprint,
    group_rank,
    is_nccl,
)

__all__ = ["Members", "Binding"]


def _averaged(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


_REQUIRES_GRAD = operator.attrgetter("requires_grad")


def _trained(p: torch.Tensor) -> bool:
    """Whether a round averages parameter ``p``: floating (or complex) and ``requires_grad``."""
    return p.requires_grad and _averaged(p)


class Members:
    """What a round averages, read afresh each time: the trainable parameters, then floating buffers.

    Parameters with ``requires_grad=False`` (frozen: an embedding kept fixed while the rest
    trains) are not averaged and not sent, as torch's averagers skip parameters without
    gradients; with ``sync_on_init`` they are broadcast once, at binding. Setting
    ``requires_grad`` later changes what the next round averages. Parameters that are not
    floating-point (an ``int64`` counter, necessarily frozen) are never broadcast either. Every
    parameter, averaged or not, counts in the cross-rank layout check, with its
    ``requires_grad`` flag, so ranks that freeze different parameters are told so.

    Args:
        owner: the optimizer whose current ``param_groups`` and ``state`` are read (``load_state_dict``
            rebinds them).
        buffers_module: the module whose floating-point buffers are averaged too, or ``None``.
        optimizer_state: the inner optimizer's per-parameter state is averaged too (in its own
            engine: see :meth:`optimizer_state`); it joins the cross-rank layout check.
    """

    def __init__(self, owner: Any, buffers_module: nn.Module | None, optimizer_state: bool = False,
                 sharding: Any = None) -> None:
        self._owner = owner
        #: the sharded parameters' :class:`~localsgd_optim._sharded.Sharding`, or ``None`` (none is sharded)
        self.sharding = sharding
        self._params: list[torch.Tensor] = []  # the last answer of params(), and what it was read from:
        self._all: list[torch.Tensor] = []
        self._flags: list[bool] = []
        self.buffers_module = buffers_module
        self.averages_optimizer_state = optimizer_state

    @property
    def dynamic(self) -> bool:
        """Whether the layout can change between rounds without the tensors moving (state appears)."""
        return self.averages_optimizer_state

    def _state_items(self) -> list[tuple[int, str, torch.Tensor]]:
        """(parameter index, key, tensor) of the averaged state: no names formatted (the hot path)."""
        if not self.averages_optimizer_state:
            return []
        state, out = self._owner.state, []
        self.params()  # (refreshes the trained parameters)
        local = self.sharding.local if self.sharding is not None else None
        for i, p in enumerate(self._params):
            for key, value in sorted(state.get(p, {}).items()):
                if (key != "step" and isinstance(value, torch.Tensor) and value.shape == p.shape
                        and (value.is_floating_point() or value.is_complex())):
                    out.append((i, key, value if local is None else local(value)))
        return out

    def optimizer_state_tensors(self) -> list[torch.Tensor]:
        """The inner optimizer's floating per-parameter state shaped like its parameter (Adam's
        moments, SGD's momentum buffer), in parameter then key order; never ``step``."""
        return [t for _, _, t in self._state_items()]

    def optimizer_state(self) -> list[tuple[str, torch.Tensor]]:
        """:meth:`optimizer_state_tensors` with their names (for errors)."""
        names = self.param_names()
        return [(f"optimizer state {key!r} of {names[i]}", t) for i, key, t in self._state_items()]

    def _named_params(self) -> list[tuple[str, torch.Tensor]]:
        return named_params(self._owner.param_groups)

    def sharding_identity(self) -> list[tuple]:
        """Which shard of each sharded parameter this rank holds (empty for an unsharded model)."""
        return self.sharding.identity(self._named_params()) if self.sharding is not None else []

    def params(self) -> list[torch.Tensor]:
        """The parameters averaged: every floating-point (or complex) one with ``requires_grad``,
        in ``param_groups`` order.

        Read at every round, so it is the hot path of a round's Python: the parameters' ids and
        ``requires_grad`` flags are gathered with C-level maps and compared with the last call's;
        only a change (a group added, a load, a parameter frozen) rebuilds the list. A tensor that
        requires grad is floating-point or complex (torch allows no other), so the flag decides.
        """
        everything = list(itertools.chain.from_iterable([group["params"] for group in self._owner.param_groups]))
        flags = list(map(_REQUIRES_GRAD, everything))
        if flags != self._flags or len(everything) != len(self._all) or not all(map(operator.is_, everything, self._all)):
            self._params = [p for p, trained in zip(everything, flags) if trained]
            self._all, self._flags = everything, flags
        if self.sharding is not None:  # each sharded parameter's local shard, read afresh
            return self.sharding.locals(self._params)
        return list(self._params)

    def frozen(self) -> list[torch.Tensor]:
        """The floating-point (or complex) parameters with ``requires_grad=False``: broadcast at
        binding, never averaged (a sharded one's local shard)."""
        frozen = [p for group in self._owner.param_groups for p in group["params"]
                  if not p.requires_grad and _averaged(p)]
        return frozen if self.sharding is None else [self.sharding.local(p) for p in frozen]

    def before_round(self) -> None:
        """Before any averaged value is written: every FSDP2 module resharded (see :mod:`._sharded`)."""
        if self.sharding is not None:
            self.sharding.before_round()

    def device(self) -> torch.device | None:
        """The device of the first tensor averaged now (``None`` if there is none); O(1) when the
        first parameter is averaged."""
        first = next((p for group in self._owner.param_groups for p in group["params"] if _trained(p)), None)
        if first is None:
            first = next((b for _, b in self.buffers()), None)
        return first.device if first is not None else None

    def buffers(self) -> list[tuple[str, torch.Tensor]]:
        # Collected afresh each round: module.to() rebinds buffer objects. Integer buffers
        # (BatchNorm's num_batches_tracked) count steps identically on every rank: left alone.
        if self.buffers_module is None:
            return []
        return [(n, b) for n, b in self.buffers_module.named_buffers()
                if b.is_floating_point() or b.is_complex()]

    def tensors(self) -> list[torch.Tensor]:
        """Everything a round averages, in a rank-independent order: parameters, then buffers."""
        return self.params() + [b for _, b in self.buffers()]

    def param_names(self) -> list[str]:
        """Names of the parameters averaged (lined up with :meth:`params`)."""
        return [n for n, p in self._named_params() if _trained(p)]

    def names(self) -> list[str]:
        """Names lined up with :meth:`tensors` (then the optimizer state, when averaged)."""
        names = self.param_names() + [f"buffer {n!r}" for n, _ in self.buffers()]
        if self.averages_optimizer_state:  # after everything the engine averages: indices still line up
            names += [n for n, _ in self.optimizer_state()]
        return names

    def layout_names(self) -> list[str]:
        """Names lined up with :meth:`layout`: every parameter, averaged or not."""
        return [n for n, _ in self._named_params()] + self.names()[len(self.param_names()):]

    def layout(self, requires_grad: bool = True) -> list[tuple]:
        """Device, dtype and shape per tensor, and the parameters' strides: flat storage and the
        global copy keep a parameter's memory order, so ranks must agree on it for their buckets
        to line up element for element. Every parameter counts, averaged or not, with its
        ``requires_grad`` flag last: it decides whether the parameter is averaged. The argument
        ``requires_grad=False`` leaves the flag out (a difference in it is explained apart, by
        :meth:`requires_grad_disagreement`)."""
        describe = self.sharding.describe if self.sharding is not None else (lambda t: ())
        params = [describe_tensor(t) + (tuple(t.stride()),) + describe(t) + ((t.requires_grad,) if requires_grad else ())
                  for _, t in self._named_params()]
        return params + [describe_tensor(b) for _, b in self.buffers()] + \
            [describe_tensor(s) + (tuple(s.stride()),) for s in self.optimizer_state_tensors()]

    def requires_grad_disagreement(self, group: dist.ProcessGroup | None) -> str | None:
        """A collective: the first parameter whose ``requires_grad`` differs between ranks, said
        identically on every rank, or ``None``. Only meaningful once the layouts without the flag
        agree (same parameters in the same order)."""
        mine = [(n, p.requires_grad) for n, p in self._named_params()]
        everyone: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(everyone, mine, group=group)
        for rank, theirs in enumerate(everyone[1:], start=1):
            for (name, a), (_, b) in zip(everyone[0], theirs):
                if a != b:
                    return (f"LocalSGDOptimizer: ranks disagree on which parameters are trained: {name} has "
                            f"requires_grad={a} on rank 0, requires_grad={b} on rank {rank}. Parameters with "
                            "requires_grad=False are not averaged, so freeze and unfreeze the same parameters "
                            "on every rank, before the same step.")
        return None

    def check_averageable(self) -> None:
        for name, p in self._named_params():
            if not _averaged(p) and p.requires_grad:  # (torch itself refuses this today)
                raise TypeError(
                    f"{name} has dtype {p.dtype} and requires grad: only floating-point and complex "
                    "parameters can be averaged; remove it from the optimizer or set requires_grad=False"
                )


class Binding:
    """A bound process group: its bucket engine, where the control tensor lives, the layout digest.

    Args:
        group: the ranks averaged over (``None``: the default group).
        world_size: ranks in ``group``.
        members: the tensors averaged.
        settings: returns what every rank must agree on (folded into the digest).
        bucket_cap_mb: the largest bucket.
        flat_params: move the parameters into flat storage (see :class:`~localsgd_optim._flat.FlatStorage`).
        breaks: tensor indices no bucket straddles (fragment boundaries).
        check_finite: scan every rank for NaN/Inf before each round.
        cursor: the schedule's :class:`~localsgd_optim._schedule.Cursor`: each round's control
            collective says its ``step`` and ``origin``.
    """

    def __init__(self, group: dist.ProcessGroup | None, world_size: int, members: Members,
                 settings: Callable[[], dict[str, Any]], bucket_cap_mb: float, flat_params: bool = True,
                 breaks: Sequence[int] = (), check_finite: bool = True, cursor: Any = None) -> None:
        members.check_averageable()  # local and before any collective: every rank raises alike
        tensors = members.tensors()
        self.group = group
        self.world_size = world_size
        self.members = members
        self.settings = settings
        self.flat_params = flat_params
        self.check_finite = check_finite
        self.cursor = cursor  # the step count, and the count this run started or resumed from
        self.engine = BucketEngine(tensors, bucket_cap_bytes(bucket_cap_mb), flat_params, len(members.params()),
                                   breaks, evict=True, sharding=members.sharding)
        self._nccl = is_nccl(group)
        self._state_ids: list[tuple[int, int]] = []  # the averaged optimizer state the digest describes
        self.digest = self._digest()

    @property
    def control_device(self) -> torch.device:
        """Where the round's tiny control tensor lives: the CPU, except on NCCL, which needs it on
        the GPU of the tensors averaged now (read at each call: ``model.to("cuda:1")`` after
        binding moves it too)."""
        device = self.members.device() if self._nccl else None
        return device if device is not None else torch.device("cpu")

    def _digest(self) -> int:
        return fingerprint(self.settings(), self.members.layout())

    def _explain_layout(self) -> None:
        # Called on every rank alike (the digests differ): shapes, dtypes and settings first, then
        # which parameters are frozen, the one difference check_ranks_agree would not name.
        check_ranks_agree(self.group, self.settings(), self.members.layout(requires_grad=False),
                          self.members.layout_names())
        message = self.members.requires_grad_disagreement(self.group)
        if message is not None:
            raise LayoutMismatchError(message)

    def refresh(self) -> int:
        """Follow the members: re-plan the engine if they moved, were rebound, (un)frozen or gained
        state; return how many parameters it averages (they lead its tensor list)."""
        params = self.members.params()
        # The trainable set can change (unfreezing): the parameters, and only they, may move.
        self.engine.movable = len(params)
        replanned = self.engine.refresh(params + [b for _, b in self.members.buffers()])
        # identity and storage: a state tensor rebound through .data (cast, moved) keeps its id
        state = [(id(t), t.data_ptr()) for t in self.members.optimizer_state_tensors()] if self.members.dynamic else []
        if replanned or state != self._state_ids:  # moved, rebound, (un)frozen, new state
            self.digest, self._state_ids = self._digest(), state
        return len(params)

    def control(self, kind: RoundKind, prepare: Callable[[], None], joined: bool = False, group: Any = None,
                riders: Sequence[Any] = (), weight: int = -1) -> Share:
        """Prepare locally, then run the round's control collective; return its :class:`Share` (see
        :func:`~localsgd_optim._dist.agree_on_round`: how many ranks send data, or their total weight).

        Everything that can fail locally (re-planning, ``prepare``, the NaN scan) happens before
        the gather, and a failure is announced in it: no rank is ever left waiting in a data
        collective, and a disagreement raises on every rank before any data moves.
        """
        return self.start_control(kind, prepare, joined, group, riders, weight).finish()

    def start_control(self, kind: RoundKind, prepare: Callable[[], None], joined: bool = False, group: Any = None,
                      riders: Sequence[Any] = (), weight: int = -1, async_op: bool = False) -> PendingAgreement:
        """:meth:`control`, its gather launched (``async_op``: not waited for) and its verdict left to
        :meth:`~localsgd_optim._dist.PendingAgreement.finish`."""
        nonfinite, local_error = -1, None
        try:
            self.members.before_round()  # FSDP2 resharded: what a round writes, the next forward reads
            self.refresh()
            prepare()
            if self.check_finite and kind != RoundKind.BIND and not joined:
                nonfinite = self.engine.first_nonfinite()
                for rider in riders:  # the optimizer state: named after the engine's tensors
                    if nonfinite < 0 and (found := rider.first_nonfinite()) >= 0:
                        nonfinite = len(self.engine.tensors) + found
        except Exception as e:  # noqa: BLE001 - re-raised on this rank right after the gather
            local_error = e
        cursor = self.cursor  # its position: the step count, or with round_every_s the round count
        row = [kind, cursor.position, cursor.position_origin, self.digest, nonfinite, int(joined),
               int(local_error is not None), weight]
        return PendingAgreement(self.group if group is None else group, self.control_device, row,
                                self._explain_layout, self.members.names, local_error, cursor.unit, async_op)

    @contextlib.contextmanager
    def errors(self, what: Callable[[], str]) -> Iterator[None]:
        """Re-raise a communication failure as AveragingRoundError saying which round (``what()``, formatted
        only then); pass the rest."""
        try:
            yield
        except (LocalSGDError, torch.OutOfMemoryError, NotImplementedError):
            raise
        except RuntimeError as e:  # gloo/NCCL errors: a dead peer, a broken link, a timeout
            raise AveragingRoundError(
                f"LocalSGDOptimizer: {what()} failed on rank {group_rank(self.group)} of {self.world_size}: "
                f"{type(e).__name__}: {e}. If a rank died, restart the job from the last checkpoint "
                "(see docs/failure-modes.md)."
            ) from e
