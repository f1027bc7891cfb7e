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
4. ``manager.should_commit()``, then one more tiny all-reduce (``MIN``): torchft's vote is per
   replica group, and a round must be kept by every participant or by none. A failed vote, or a
   group too broken to vote, restores the snapshot on every participant: nothing is half-applied.

Not yet: healing a returning replica from a peer through ``manager.register_state_dict_fn``,
overlapped rounds (a round in flight would span two quorums: refused), sharded replicas.

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

from ._dist import AveragingRoundError
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
                             "(torchft's ProcessGroupGloo or ProcessGroupNCCL, registered), got process_group=None")
        if optimizer._config.overlap_steps:
            raise ValueError(
                f"Managed: overlap_steps={optimizer._config.overlap_steps} is not supported under torchft yet: an "
                "overlapped round lands steps after its quorum, when the membership may have changed; use 0")
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
        manager.start_quorum()
        world = dist.get_world_size(opt.process_group)
        bound = opt._binding.world_size if opt._binding is not None else (1 if opt._single else None)
        if bound is not None and bound != world:  # the quorum changed: bind again to the reconfigured group
            opt._binding, opt._single, opt._pending_broadcast = None, False, False
        tensors = opt._members.tensors()
        saved = [t.detach().clone() for t in tensors]
        entry = map_tensors(opt.state_dict()[STATE_KEY], lambda t: t.detach().clone())
        try:
            run()
        except AveragingRoundError as e:  # a peer gone mid-round: the vote fails, the round is undone
            manager.report_error(e)
        # (a replica built differently, NaN parameters, ranks at different steps: raised, as a misuse or a
        # poisoned replica that undoing the round would not cure)
        if self._everyone(manager.should_commit()):
            self.rounds_committed += 1
            return
        with torch.no_grad():
            for t, s in zip(tensors, saved):
                t.copy_(s)
        opt.load_local_sgd_entry(entry, lambda: None)
        self.rounds_rolled_back += 1

    def _everyone(self, commit: bool) -> bool:
        """Whether every participant votes to commit (torchft's vote is per replica group)."""
        opt = self.optimizer
        if dist.get_world_size(opt.process_group) == 1:
            return commit
        flag = torch.tensor([int(commit)], dtype=torch.int32, device=opt.join_device)
        try:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=opt.process_group)
        except RuntimeError as e:  # the group broke after the round: undo it
            self.manager.report_error(e)
            return False
        return bool(flag.item())
