"""Rounds under torchft's ``Manager``: its quorum opens each round, and a round that does not commit is undone.

torchft owns membership: which replica groups are in the quorum, the reconfigured process
group, and the commit vote. :class:`Managed` puts our rounds (bucketed, compressed, fragment by
fragment) under it, and keeps every torchft call in this module.

Each global round (and each ``sync()``):

1. ``manager.start_quorum()``; if the quorum's size changed, the optimizer binds again to the
   reconfigured group (the control collective then checks layouts and settings afresh);
2. a snapshot of what the round changes: the averaged tensors and the ``"local_sgd"`` entry
   (global copy, outer momentum, error-feedback residuals);
3. the round, on the manager's group; an error in it is reported to the manager, not raised;
4. one tiny all-reduce (``MIN``) of "completed the round" over the participants, *then*
   ``manager.should_commit()``, told of any failure: torchft's vote is per replica group, and a
   round must be kept by every participant or by none, with torchft's step counts equal. A failed
   vote, or a group too broken to vote, restores the snapshot on every participant: nothing is
   half-applied. An error that is not a failed collective (layouts, step counts, NaN) is raised
   after the undo, on every participant.

Not yet: healing a returning replica from a peer through ``manager.register_state_dict_fn`` (a
growing quorum raises, and the quorum is started with ``allow_heal=False`` so torchft never
overwrites a replica's state), overlapped rounds and warmup (refused), sharded replicas (refused).

Example::

    manager = torchft.Manager(pg=torchft.ProcessGroupGloo(), min_replica_size=2, use_async_quorum=False, ...)
    manager.start_quorum(); manager._pg.register("torchft")
    opt = LocalSGDOptimizer(AdamW(model.parameters()), k=8, process_group=manager._pg)
    managed = Managed(opt, manager)          # then train as usual: opt.step(), opt.sync()
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist

from ._dist import AveragingRoundError, LocalSGDError, on_every_rank
from ._state import STATE_KEY
from .checkpoint import map_tensors
from .optimizer import LocalSGDOptimizer

__all__ = ["Managed"]


class Managed:
    """Run a :class:`~localsgd_optim.LocalSGDOptimizer`'s rounds under a ``torchft.Manager``.

    Args:
        optimizer: built with ``process_group`` = the manager's process group.
        manager: a ``torchft.Manager`` with ``use_async_quorum=False`` (a round needs its quorum
            before it starts, as DiLoCo does).

    Attributes:
        rounds_committed: rounds kept.
        rounds_rolled_back: rounds undone (a failed vote, or an error in the round).
    """

    def __init__(self, optimizer: LocalSGDOptimizer, manager: Any) -> None:
        if not isinstance(optimizer, LocalSGDOptimizer):
            raise TypeError(f"optimizer must be a LocalSGDOptimizer, got {type(optimizer).__name__}")
        if optimizer.process_group is None:
            raise ValueError("Managed: build the LocalSGDOptimizer with process_group=the manager's process group "
                             "(torchft's ProcessGroupGloo, registered), got process_group=None")
        refused = {
            "overlap_steps": (optimizer.overlap_steps, "an overlapped round lands steps after its quorum, "
                              "when the membership may have changed"),
            "warmup_steps": (optimizer.warmup_steps, "warmup rounds run at every step, outside any quorum"),
            "sharded replicas": (optimizer._members.sharding is not None, "one managed group per shard index is "
                                 "not built yet"),
        }
        for name, (value, why) in refused.items():
            if value:
                raise ValueError(f"Managed: {name}={value!r} is not supported under torchft yet: {why}")
        if getattr(manager, "_use_async_quorum", False):
            raise ValueError("Managed: build the torchft.Manager with use_async_quorum=False: a round must have its "
                             "quorum before it starts")
        self.optimizer = optimizer
        self.manager = manager
        self.rounds_committed = 0
        self.rounds_rolled_back = 0
        optimizer._round_guard = self._round

    def _round(self, run: Callable[[], None]) -> None:
        opt, manager = self.optimizer, self.manager
        manager.start_quorum(allow_heal=False)  # (healing is not built: never let torchft overwrite this replica)
        world = dist.get_world_size(opt.process_group)
        bound = opt._binding.world_size if opt._binding is not None else (1 if opt._single else None)
        if bound is not None and world > bound:
            raise LocalSGDError(
                f"Managed: the quorum grew from {bound} to {world} replica groups, but a returning or new replica "
                "cannot be healed from a peer yet (its global copy and step count would differ): restart every "
                "group together, or keep the survivors running without it")
        if bound is not None and world < bound:  # a group is gone: bind again to the reconfigured group
            opt._binding, opt._single, opt._pending_broadcast = None, False, False
        tensors = opt._members.tensors()
        if opt.average_optimizer_state:
            tensors = tensors + opt._members.optimizer_state_tensors()
        saved = [t.detach().clone() for t in tensors]
        entry: dict[str, Any] = {}
        opt._rounds.state(entry)
        entry = map_tensors(entry, lambda t: t.detach().clone())
        error: BaseException | None = None
        try:
            run()
        except BaseException as e:  # noqa: BLE001 - every participant votes before anything is raised
            error = e
        ok = self._everyone(error is None and manager.errored() is None)
        if not ok and manager.errored() is None:  # torchft's vote (per group) must say what ours says
            manager.report_error(error if isinstance(error, Exception) else
                                 RuntimeError("another replica group could not complete this round"))
        try:
            commit = manager.should_commit()
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
                self.rounds_rolled_back += 1
        if error is not None and not isinstance(error, AveragingRoundError):
            raise error  # a misuse (layouts, steps) or a poisoned replica: undone everywhere, then raised

    def _everyone(self, ok: bool) -> bool:
        """Whether every participant completed the round (torchft's vote is per replica group)."""
        opt = self.optimizer
        if dist.get_world_size(opt.process_group) == 1:
            return ok
        device = opt._binding.control_device if opt._binding is not None else torch.device("cpu")
        try:
            return on_every_rank(ok, opt.process_group, device)
        except Exception as e:  # noqa: BLE001 - a group too broken to vote: undo the round
            if self.manager.errored() is None:
                self.manager.report_error(e)
            return False
