"""Rounds under torchft's ``Manager``: its quorum opens each round, a round that does not commit is
undone, and a replica that comes back heals from a live peer.

torchft owns membership: which replica groups are in the quorum, the reconfigured process
group, the commit vote and the transport a heal uses. :class:`Managed` puts our rounds
(bucketed, compressed, fragment by fragment) under it, and keeps every torchft call in this module.

Each global round (and each ``sync()``):

1. ``manager.start_quorum()``. A replica group that is behind (a returning host, or one whose
   first quorum this is: torchft's ``init_sync``) receives a live peer's state through torchft's
   own transport, inside that call (see *Healing*). When the quorum is a new one (its id changed:
   every member sees that alike), every member binds again to the reconfigured group, so the
   control collective checks layouts and settings afresh, after one tiny vote that skips the
   round if a member could not heal, or if the members' *lineages* differ (see below).
2. A snapshot of what the round changes: the averaged tensors and the ``"local_sgd"`` entry
   (global copy, outer momentum, error-feedback residuals).
3. The round, on the manager's group; an error in it is reported to the manager, not raised.
4. One tiny all-reduce (``MIN``) of "completed the round" over the participants, *then*
   ``manager.should_commit()``, told of any failure: torchft's vote is per replica group, and a
   round must be kept by every participant or by none, with torchft's step counts equal. A failed
   vote, or a group too broken to vote, restores the snapshot on every participant: nothing is
   half-applied. An error that is not a failed collective (layouts, step counts, NaN) is raised
   after the undo, on every participant.

Healing. The donor is the replica torchft picks (one with the most committed rounds). At the
moment its quorum forms, it is at a round boundary (or in :meth:`Managed.start`), and it sends
its state as it is there: every parameter (frozen ones too) and averaged buffer, the inner
optimizer's state (a warm copy, not a fresh one: the joiner's next inner step then behaves as the
donor's would), the step count, schedule phase and fragment phase, the global copy and outer
momentum; plus whatever else was registered with ``manager.register_state_dict_fn`` (the data
position, an LR scheduler). Two rules:

* the joiner's error-feedback residuals start at **zero**: a residual is its owner's unsent
  error, and a copy would send the donor's twice;
* in the round it joins, the joiner **contributes nothing** (it sends zeros, as a rank under
  ``Join`` does) and the mean divides by the other participants: its state is a copy of the
  donor's, so counting it would weigh the donor twice. It receives the round's result and leaves
  it equal to every other replica; the survivors redo no step.

A joiner whose layout or settings differ from the donor's does not load anything: it votes
against the round (skipped on every member, nothing to undo), and raises a ``LocalSGDError``
naming the first difference; the survivors carry on. The donor's copy is taken when its quorum
forms (torchft's HTTP transport serves tensors by reference while the round changes them) and
is held by the transport until its next heal.

Lineage. torchft heals only a replica whose step count is behind. A replica group alone in its
quorums (the others down, or cut off from the lighthouse: torchft's lighthouse forms no quorum of
half or fewer of the replicas it hears from) commits rounds alone; two that did so at once can
meet at the *same* step with different states, and torchft would heal neither: from then on they
average against different global copies. Each replica therefore keeps a lineage, a digest of the
quorum ids its kept rounds were committed in (alike on every member of a quorum; a heal copies the
donor's), and the vote of a new quorum compares them. If they differ, the round is skipped on
every member, and those without the largest lineage set torchft's step count one back
(``manager.load_state_dict``), so that torchft's next quorum heals them from one that has it.
Lineages start at 0 with every ``Managed``, and are not checkpointed: a group restarted from
its own checkpoint has lineage 0, the smallest, and heals from its peers if it meets them at their step.

Sharded replicas (FSDP2). A replica group of ``S`` ranks, each sharding the model with
``fully_shard(model, mesh=group_mesh)`` over its group's own 1-D mesh, runs one ``Manager`` per
rank (``rank`` = its shard index, ``world_size=S``, the same ``replica_id`` in the group). torchft
then connects, in each rank's managed process group, the ranks of the same shard index across the
replica groups, and the rounds average each local shard over it, exactly as with
``process_group=mesh["replicate"]`` in one world. torchft's vote is per replica group (its
manager server ANDs the group's ranks), so a failure on one shard index undoes the round on every
rank. A heal pairs group ranks too: each rank of the returning group fetches the checkpoint of the
donor group's rank with its own shard index, which sends its local shards (and the inner
optimizer's state as local shards, wrapped back as DTensors placed as the joiner's parameters are);
the identity check compares the mesh coordinate and local shape of every shard, so a wrong
pairing loads nothing. torchft 0.2.0 has no managed ``DeviceMesh`` (``ft_init_device_mesh``), so
the group's mesh is its own ranks only: native HSDP over a managed dimension is not possible.

Requirements: ``use_async_quorum=False`` (a round needs its quorum before it starts),
``init_sync=True`` (torchft's default: replicas start equal, and a replica returning before the
first commit heals too), the ``DYNAMIC`` world size mode (spares would be averaged in). Not yet:
overlapped rounds and warmup (refused), FSDP1 replicas (refused; tensor-parallel DTensors take the
FSDP2 path but are untested under torchft).

Example::

    manager = torchft.Manager(pg=torchft.ProcessGroupGloo(), load_state_dict=None, state_dict=None,
                              min_replica_size=1, use_async_quorum=False, ...)
    manager._pg.register("torchft")                    # (torchft's groups need a name)
    opt = LocalSGDOptimizer(AdamW(model.parameters()), k=8, manager=manager)   # opt.managed: a Managed
    manager.register_state_dict_fn("sched", sched.load_state_dict, sched.state_dict)  # more to heal
    step = opt.managed.start()       # heals here if the others are ahead: train from this step
    while step < total: ...; opt.step(); step = opt.num_steps
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ._dist import AveragingRoundError, LocalSGDError, is_nccl, on_every_rank, rank_from
from ._state import STATE_KEY
from .checkpoint import PER_RANK_KEYS, map_tensors
from .optimizer import LocalSGDOptimizer
from .rounds import Round
from .rounds.fragments import FragmentedRound

__all__ = ["Managed"]

#: what a replica is doing when its quorum forms; a healed replica does what its donor does
_START, _SCHEDULED, _SYNC = "start", "scheduled", "sync"
_SKIPPED = "skipped"  #: (what _open returns when a member of a new quorum could not heal: nothing runs)


class Managed:
    """Run a :class:`~localsgd_optim.LocalSGDOptimizer`'s rounds under a ``torchft.Manager``.

    Args:
        optimizer: built with ``process_group`` = the manager's process group (registered).
        manager: a ``torchft.Manager`` with ``use_async_quorum=False`` and ``init_sync=True``.
        key: the key of this optimizer's state in the manager's heal payload.

    Attributes:
        rounds_committed: rounds kept (a round joined after a heal included).
        rounds_rolled_back: rounds undone (a failed vote, an error in the round), or skipped
            because a member could not heal.
        lineage: a digest of the quorums this replica's committed rounds were kept in (a heal copies
            the donor's). Members of a new quorum compare it: see :meth:`_open`.
        lineage_conflicts: new quorums whose members had different lineages (each skipped).
        heals: one ``{"step", "from", "in_step"}`` per heal of this replica: the step count it
            continued from, the donor's torchft replica id, and whether the donor was inside
            ``step()`` (a scheduled round): then what your loop does after ``opt.step()`` for that
            step (``sched.step()``, for one) is still to do on this replica, as the donor will.
    """

    def __init__(self, optimizer: LocalSGDOptimizer, manager: Any, key: str = "localsgd_optim") -> None:
        if not isinstance(optimizer, LocalSGDOptimizer):
            raise TypeError(f"optimizer must be a LocalSGDOptimizer, got {type(optimizer).__name__}")
        if optimizer.process_group is None:
            raise ValueError("Managed: build the LocalSGDOptimizer with process_group=the manager's process group "
                             "(torchft's ProcessGroupGloo, registered), got process_group=None")
        sharding = optimizer._members.sharding
        refused = {
            "overlap_steps": (optimizer.overlap_steps, "an overlapped round lands steps after its quorum, "
                              "when the membership may have changed"),
            "warmup_steps": (optimizer.warmup_steps, "warmup rounds run at every step, outside any quorum"),
            "FSDP1 replicas": (sharding is not None and sharding.has_fsdp1, "a heal sends local shards, and FSDP1's "
                               "flat shards are not checked or rewrapped by it: shard with FSDP2 (fully_shard)"),
            "fragments without an outer_optimizer": (
                optimizer._config.fragments > 1 and optimizer._rounds.outer_optimizer() is None,
                "a replica that heals must start the fragments not synced at that step from their global copy "
                "(the donor's progress since their last round would count twice), and plain fragments keep none"),
        }
        for name, (value, why) in refused.items():
            if value:
                raise ValueError(f"Managed: {name}={value!r} is not supported under torchft yet: {why}")
        manager_needs = {
            "use_async_quorum": (getattr(manager, "_use_async_quorum", False), False,
                                 "a round must have its quorum before it starts"),
            "init_sync": (getattr(manager, "_init_sync", True), True,
                          "replicas start equal only if the first quorum heals them from one, and a replica "
                          "that returns before the first commit must heal too"),
            "world_size_mode": (getattr(getattr(manager, "_replica_world_size_mode", None), "name", "DYNAMIC"),
                                "DYNAMIC", "a spare is in the process group but not a participant: it would be "
                                "averaged in"),
        }
        for name, (value, wanted, why) in manager_needs.items():
            if value != wanted:
                raise ValueError(f"Managed: build the torchft.Manager with {name}={wanted} (got {value}): {why}")
        self.optimizer = optimizer
        self.manager = manager
        # torch sees the managed group as a world of one (rank 0 on every replica); its slot in the group's
        # collectives is the replica's rank in the quorum (spares and asynchronous quorums are refused above)
        rank_from(optimizer.process_group, lambda: manager.participating_rank())
        self.rounds_committed = 0
        self.rounds_rolled_back = 0
        self.lineage = 0
        self.lineage_conflicts = 0
        self.heals: list[dict[str, Any]] = []
        self._doing = _START
        self._started = False
        self._quorum_id: Any = None  # the quorum the optimizer is bound to
        self._healed: str | None = None  # what the donor was doing, if this quorum healed this replica
        self._heal_error: BaseException | None = None
        optimizer._pending_broadcast = False  # torchft's first quorum makes the replicas equal (init_sync)
        optimizer._round_guard = self._round
        registered = getattr(manager, "_user_state_dicts", {})
        if key in registered:  # a new optimizer on the same manager (a second run) takes the key over
            registered[key], manager._load_state_dict_fns[key] = self._state, self._load
        else:
            manager.register_state_dict_fn(key, self._load, self._state)

    def start(self) -> int:
        """Join the quorum before the first step; return the step count to train from.

        Every replica group calls it once, before its first step. With every replica starting
        together, torchft's first quorum makes them equal (``init_sync``) and this returns 0. A
        replica whose peers are ahead heals from one here and joins the round they are in (it
        contributes nothing to it; see the module's docstring), so it continues from the donor's
        step count: drive the training loop, and the data position, from what this returns.
        The quorum counts as one of torchft's steps (a commit), so a replica that was not in it
        is behind from then on and heals.
        """
        if self._started:
            raise LocalSGDError("Managed.start() was already called: call it once, before the first step")
        self._started = True
        healed = self._open(_START)
        if healed in (_SCHEDULED, _SYNC):
            self._commit(self._donors_round(healed), joined=True)
            if healed == _SCHEDULED:  # round_every_s: the donor's next period starts now, and so does ours
                self.optimizer._cursor.round_done()
        elif healed != _SKIPPED:
            self._should_commit()  # (nothing ran: the quorum counts as a commit, on every member)
        return self.optimizer.num_steps

    def _round(self, round_: Round, joined: bool) -> None:
        opt = self.optimizer
        if not self._started:
            raise LocalSGDError(
                "Managed: call opt.managed.start() once before the first step: it joins the quorum and "
                "heals this replica if the others are ahead; without it torchft's first round would "
                "heal every replica but one and average that one alone")
        healed = self._open(_SYNC if round_ is opt._rounds.sync else _SCHEDULED)
        if healed == _START:  # healed from a replica that is only starting: it commits its start(), so does this
            self._should_commit()
            return
        if healed == _SKIPPED:  # a member of the new quorum could not heal: nothing ran, already voted
            return
        if healed is not None:
            round_, joined = self._donors_round(healed), True
        self._commit(round_, joined)

    def _donors_round(self, doing: str) -> Round:
        rounds = self.optimizer._rounds
        return rounds.sync if doing == _SYNC else rounds.scheduled

    def _open(self, doing: str) -> str | None:
        """Start the quorum (a heal happens in it); bind again if it is a new one.

        Returns what the donor was doing if this replica healed, ``_SKIPPED`` if a member of a
        new quorum could not heal (no round runs), else ``None``.

        Lineage: torchft heals only a replica whose step count is behind. Two replica groups that
        each committed rounds in quorums without the other (each alone while the other was cut off
        from the lighthouse) can meet at the *same* step with different states, and neither would
        heal. The members of a new quorum therefore compare their lineages in the same vote; if they
        differ, the round is skipped on every member and those without the newest (largest) lineage
        set torchft's step count one back, so torchft's next quorum heals them from a replica that
        has it. Nothing else changes: the healed replica joins that round as any returning one does.
        """
        opt, manager = self.optimizer, self.manager
        self._doing, self._healed, self._heal_error = doing, None, None
        if torch.accelerator.is_available():  # a donor's copy is taken on torchft's recovery stream:
            torch.accelerator.synchronize()   # the inner step's kernels must have landed
        manager.start_quorum()  # allow_heal: _load runs in here when this replica is behind
        quorum = manager._quorum_id
        if quorum == self._quorum_id:  # (a heal in a continuing quorum: its layouts were checked when it formed)
            if self._heal_error is not None:
                raise self._heal_error
            return self._healed
        self._quorum_id = quorum  # every member of a new quorum sees it new: all of them vote
        opt._binding, opt._single = None, False  # bind again: the control collective checks layouts afresh
        ok, newest = self._new_quorum_vote(self._heal_error is None and manager.errored() is None)
        if ok and newest is None:
            return self._healed
        if manager.errored() is None:
            manager.report_error(self._heal_error if isinstance(self._heal_error, Exception) else
                                 RuntimeError("a member of the new quorum could not heal") if not ok else
                                 RuntimeError("replicas at the same torchft step with different histories"))
        self._should_commit()  # False: nothing ran, nothing to undo; torchft's step counts stay equal
        self._quorum_id = None  # the next quorum binds again, whoever is in it
        if self._heal_error is not None:
            raise self._heal_error
        self.rounds_rolled_back += 1
        if ok:  # same torchft step, other histories: torchft would heal neither
            self.lineage_conflicts += 1
            if self.lineage != newest:  # one step behind: torchft's next quorum heals it from a newest one
                manager.load_state_dict({"step": max(manager.current_step() - 1, 0),
                                         "batches_committed": manager.batches_committed()})
        return _SKIPPED

    def _commit(self, round_: Round, joined: bool) -> None:
        """Run ``round_`` under a snapshot, vote, and keep it or undo it on every participant."""
        opt, manager = self.optimizer, self.manager
        tensors = opt._members.tensors()
        if opt.average_optimizer_state:
            tensors = tensors + opt._members.optimizer_state_tensors()
        saved = [t.detach().clone() for t in tensors]
        entry: dict[str, Any] = {}
        opt._rounds.state(entry)
        entry = map_tensors(entry, lambda t: t.detach().clone())
        tokens = opt._tokens  # (the work the round weighs: still to weigh if it is undone)
        error: BaseException | None = None
        try:
            opt._run(round_, joined)
        except BaseException as e:  # noqa: BLE001 - every participant votes before anything is raised
            error = e
        ok = self._everyone(error is None and manager.errored() is None)
        if not ok and manager.errored() is None:  # torchft's vote (per group) must say what ours says
            manager.report_error(error if isinstance(error, Exception) else
                                 RuntimeError("another replica group could not complete this round"))
        try:
            commit = self._should_commit()
        except BaseException:
            commit = False
            raise
        finally:
            if commit:
                self.rounds_committed += 1
            else:
                with torch.no_grad():
                    for t, s in zip(tensors, saved):
                        t.copy_(s)
                opt._rounds.load_state(entry, opt._members.params())  # the step count did not change
                opt._tokens = tokens
                self.rounds_rolled_back += 1
        if error is not None and not isinstance(error, AveragingRoundError):
            raise error  # a misuse (layouts, steps) or a poisoned replica: undone everywhere, then raised

    def _should_commit(self) -> bool:
        """torchft's commit vote; a kept quorum extends the lineage (alike on every member: same quorum id)."""
        commit = self.manager.should_commit()
        if commit:
            self.lineage = _extend(self.lineage, self.manager._quorum_id)
        return commit

    def _vote_device(self) -> torch.device:
        opt = self.optimizer
        if opt._binding is not None:
            return opt._binding.control_device
        # (between quorums: not bound yet) NCCL needs the vote on the GPU
        return (opt._members.device() if is_nccl(opt.process_group) else None) or torch.device("cpu")

    def _everyone(self, ok: bool) -> bool:
        """Whether every participant holds ``ok`` (torchft's vote is per replica group)."""
        opt = self.optimizer
        if dist.get_world_size(opt.process_group) == 1:
            return ok
        try:
            return on_every_rank(ok, opt.process_group, self._vote_device())
        except Exception as e:  # noqa: BLE001 - a group too broken to vote: undo the round
            if self.manager.errored() is None:
                self.manager.report_error(e)
            return False

    def _new_quorum_vote(self, ok: bool) -> tuple[bool, int | None]:
        """Whether every member of a new quorum holds ``ok``, and the newest lineage if the members' differ
        (``None`` when they agree): one ``MAX`` all-reduce of ``(not ok, lineage, -lineage)``."""
        opt = self.optimizer
        if dist.get_world_size(opt.process_group) == 1:
            return ok, None
        votes = torch.tensor([int(not ok), self.lineage, -self.lineage], dtype=torch.int64, device=self._vote_device())
        try:
            dist.all_reduce(votes, op=dist.ReduceOp.MAX, group=opt.process_group)
        except Exception as e:  # noqa: BLE001 - a group too broken to vote: nothing runs
            if self.manager.errored() is None:
                self.manager.report_error(e)
            return False, None
        failed, newest, oldest = votes.tolist()
        return not failed, (newest if newest != -oldest else None)

    # -- healing: torchft's transport carries these --------------------------------------------

    def _identity(self) -> dict[str, Any]:
        """What a donor and a joiner must share: every parameter's and buffer's name, device type,
        dtype, shape (and stride), and the settings every rank agrees on."""
        members = self.optimizer._members
        layout = members.layout()
        n = len(layout) - len(members.optimizer_state_tensors())  # a fresh joiner has no inner state yet
        return {"layout": list(zip(members.layout_names()[:n], layout[:n])),
                "settings": {k: repr(v) for k, v in self.optimizer._settings().items()}}

    def _tensors(self) -> list[torch.Tensor]:
        """Every parameter (a sharded one's local shard) and averaged buffer, in a rank-independent order."""
        members = self.optimizer._members
        params = [p for _, p in members._named_params()]
        if members.sharding is not None:
            params = [members.sharding.local(p) for p in params]
        return params + [b for _, b in members.buffers()]

    def _state(self) -> dict[str, Any]:
        """The donor's side (torchft's quorum thread, while this one waits in ``start_quorum``).

        A sharded replica sends its local shards only: each rank of the joining group heals from
        the rank of the donor group that holds the same shard (torchft pairs them by group rank),
        and the identity it sends names the shard (mesh coordinate, local shape)."""
        opt = self.optimizer
        copy = lambda t: (t._local_tensor if isinstance(t, DTensor) else t).detach().clone()  # noqa: E731 - served by reference while the round runs
        return {"doing": self._doing, "from": getattr(self.manager, "_replica_id", None),
                "origin": list(opt._cursor.origins), "lineage": self.lineage, **self._identity(),
                "tensors": [copy(t) for t in self._tensors()], "optimizer": map_tensors(opt.state_dict(), copy)}

    def _load(self, state: dict[str, Any]) -> None:
        """The joiner's side (in its ``start_quorum``): refuse another layout, or take the donor's state."""
        opt = self.optimizer
        problem = _difference(self._identity(), state)
        if problem is not None:
            self._heal_error = LocalSGDError(
                f"Managed: this replica group cannot heal from {state.get('from')}: {problem}. It must wrap the "
                "same model with the same LocalSGDOptimizer settings as the replicas training now; they carry on "
                "without it.")
            return
        optimizer_state = dict(state["optimizer"])
        entry = optimizer_state.get(STATE_KEY)
        if entry is not None:  # the residuals are the donor's own unsent error: the joiner's start at zero
            optimizer_state[STATE_KEY] = _without(entry, PER_RANK_KEYS)
        behind = opt.num_steps
        if opt._members.sharding is not None:  # (written into the shards FSDP2 all-gathers from)
            for module in opt._members.sharding.modules:
                module.reshard()
        with torch.no_grad():
            for mine, theirs in zip(self._tensors(), state["tensors"]):
                mine.copy_(theirs)
        opt.load_state_dict(_as_dtensors(optimizer_state, [p for g in opt.param_groups for p in g["params"]]))
        self._from_global_copies()
        opt._cursor.origins = tuple(state["origin"])  # the control collective compares it: the donor's run's
        opt._pending_broadcast = False  # (the binding stays: a new quorum binds again in _open anyway)
        self._healed = state["doing"]
        self.lineage = state.get("lineage", 0)
        if behind or opt.num_steps:  # (not torchft's first quorum, where every replica is at step 0)
            self.heals.append({"step": opt.num_steps, "from": state["from"], "in_step": state["doing"] == _SCHEDULED})


    @torch.no_grad()
    def _from_global_copies(self) -> None:
        """Streaming DiLoCo: the fragments the donor has not synced at this step hold its progress
        since their last round. The joiner starts every fragment from its global copy, so that
        progress counts once (the fragment synced now is overwritten by the round anyway)."""
        scheduled = self.optimizer._rounds.scheduled
        if isinstance(scheduled, FragmentedRound):
            params = self.optimizer._members.params()
            for (lo, hi), inner in zip(scheduled.bounds, scheduled.inners):
                for p, g in zip(params[lo:hi], inner.outer.globals):
                    p.copy_(g)


def _difference(mine: dict[str, Any], theirs: dict[str, Any]) -> str | None:
    """The first difference between two replicas' :meth:`Managed._identity`, said plainly, or ``None``."""
    a, b = mine["layout"], [tuple(x) if isinstance(x, list) else x for x in theirs.get("layout", [])]
    for (name, x), (their_name, y) in zip(a, b):
        if (name, tuple(x)) != (their_name, tuple(y)):  # (device type, dtype, shape, ...): the first two that differ
            here, there = ((f"{d[1]} {tuple(d[2])}" if (x[1], x[2]) != (y[1], y[2]) else repr(tuple(d)))
                           for d in (x, y))
            return f"{name} is {here} here, {their_name} is {there} on the donor"
    if len(a) != len(b):
        return f"{len(a)} parameters and buffers here, {len(b)} on the donor"
    for key in sorted(set(mine["settings"]) | set(theirs["settings"])):
        here, there = mine["settings"].get(key), theirs["settings"].get(key)
        if here != there:
            return f"{key}={here} here, {key}={there} on the donor"
    return None


def _as_dtensors(optimizer_state: dict[str, Any], params: list[torch.Tensor]) -> dict[str, Any]:
    """The inner optimizer's per-parameter state, sent as local shards, wrapped back as DTensors
    placed as their parameters are (a fresh joiner has no state of its own to copy the placement from).
    A value shaped like its parameter's local shard is one (Adam's moments); a scalar ``step`` is not."""
    per_param = optimizer_state.get("state")
    if not per_param or not any(isinstance(p, DTensor) for p in params):
        return optimizer_state

    def wrap(p: torch.Tensor, value: Any) -> Any:
        if (isinstance(p, DTensor) and isinstance(value, torch.Tensor) and not isinstance(value, DTensor)
                and value.shape == p._local_tensor.shape and value.dim() == p.dim()):
            return DTensor.from_local(value, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                      stride=p.stride())
        return value
    return {**optimizer_state, "state": {i: {k: wrap(params[i], v) for k, v in entry.items()}
                                         for i, entry in per_param.items()}}


def _extend(lineage: int, quorum_id: Any) -> int:
    """The lineage after a commit in quorum ``quorum_id``: 62 bits of a digest of both (an int64 in the vote)."""
    digest = hashlib.blake2b(f"{lineage}:{quorum_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 2


def _without(tree: Any, keys: frozenset[str]) -> Any:
    """``tree`` without the dict entries named in ``keys``, at any depth (fragments nest theirs)."""
    if isinstance(tree, dict):
        return {k: _without(v, keys) for k, v in tree.items() if k not in keys}
    if isinstance(tree, list):
        return [_without(v, keys) for v in tree]
    return tree
