"""``LocalSGDOptimizer``: wrap any optimizer, average parameters across ranks every k steps."""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from ._buckets import BucketEngine, bucket_cap_bytes
from ._dist import check_ranks_agree, describe_tensor, group_size
from ._schedule import PeriodicSchedule

__all__ = ["LocalSGDOptimizer", "STATE_KEY", "STATE_VERSION"]

#: Key of the Local SGD entry inside the wrapped optimizer's state dict.
STATE_KEY = "local_sgd"
#: Version of that entry's format; bumped on any incompatible change.
STATE_VERSION = 1


class _Comm:
    """Everything needed to talk to the other ranks; ``None`` in a single process."""

    __slots__ = ("group", "world_size", "engine")

    def __init__(self, group: dist.ProcessGroup | None, world_size: int, engine: BucketEngine) -> None:
        self.group = group
        self.world_size = world_size
        self.engine = engine


class LocalSGDOptimizer(Optimizer):
    r"""Local SGD around any optimizer: local steps, parameters averaged every ``k`` steps.

    Every rank steps its own replica with ``optimizer``; inside the ``k``-th,
    ``2k``-th, ... call of :meth:`step` (after the inner update) the parameters of
    all ranks are replaced by their mean, with one flat, bucketed all-reduce per
    bucket instead of one per parameter. ``k`` counts optimizer steps, never
    micro-batches. The wrapper is a real :class:`torch.optim.Optimizer` sharing the
    inner optimizer's ``param_groups`` and ``state``, so LR schedulers, hooks and
    ``GradScaler`` work unchanged. Without an initialized process group (or with a
    world size of 1) it is a pure pass-through.

    Papers: Stich, "Local SGD Converges Fast and Communicates Little" (ICLR 2019,
    https://arxiv.org/abs/1805.09767); Lin et al., "Don't Use Large Mini-Batches,
    Use Local SGD" (ICLR 2020, https://arxiv.org/abs/1808.07217).

    Args:
        optimizer: the inner optimizer taking the local steps (any ``torch.optim.Optimizer``).
        k: optimizer steps between averaging rounds (default: 8).
        process_group: the ranks to average over (default: ``None``, the default group).
        bucket_cap_mb: largest flat buffer per collective, in MiB (default: 25.0). Extra
            memory during a round is at most two buckets.
        sync_on_init: broadcast parameters from the group's first rank at construction, so
            replicas start identical even without DDP (default: ``True``).

    Example::

        >>> model = torch.nn.Linear(4, 2)
        >>> opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), k=4)
        >>> for _ in range(8):
        ...     model(torch.ones(3, 4)).sum().backward()
        ...     opt.step()
        ...     opt.zero_grad()
        >>> opt.num_steps
        8
    """

    # GradScaler hands us ``grad_scale``/``found_inf`` and always calls step(), so a
    # step skipped for inf/NaN gradients still counts and still joins averaging.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        optimizer: Optimizer,
        k: int = 8,
        *,
        process_group: dist.ProcessGroup | None = None,
        bucket_cap_mb: float = 25.0,
        sync_on_init: bool = True,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                "optimizer must be a torch.optim.Optimizer instance, e.g. "
                f"torch.optim.AdamW(model.parameters()), got {type(optimizer).__name__}: {optimizer!r}"
            )
        if isinstance(optimizer, LocalSGDOptimizer):
            raise TypeError("optimizer is already a LocalSGDOptimizer; wrap the inner optimizer once")
        if (
            isinstance(bucket_cap_mb, bool)
            or not isinstance(bucket_cap_mb, numbers.Real)
            or not math.isfinite(bucket_cap_mb)
            or bucket_cap_mb <= 0
        ):
            raise ValueError(f"bucket_cap_mb must be a finite number > 0 (MiB), got {bucket_cap_mb!r}")
        schedule = PeriodicSchedule(k)

        self._constructed = False
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.optimizer = optimizer
        self._share_inner()
        self._schedule = schedule
        self.process_group = process_group
        self.bucket_cap_mb = float(bucket_cap_mb)
        self._num_steps = 0
        self._comm: _Comm | None = None
        self._resolved = False
        self._constructed = True

        comm = self._resolve()
        if comm is not None and sync_on_init:
            comm.engine.broadcast(dist.get_global_rank(comm.group or dist.group.WORLD, 0), comm.group)

    # -- sharing with the inner optimizer ---------------------------------------------------

    def _share_inner(self) -> None:
        # Same objects, not copies: an LR set on the wrapper is the LR the inner step uses.
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        self.defaults = self.optimizer.defaults

    @property
    def k(self) -> int:
        """Optimizer steps between averaging rounds."""
        return self._schedule.k

    @property
    def num_steps(self) -> int:
        """Calls of :meth:`step` so far (restored by :meth:`load_state_dict`)."""
        return self._num_steps

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _param_names(self) -> list[str]:
        names = []
        for g, group in enumerate(self.param_groups):
            given = group.get("param_names")
            for i in range(len(group["params"])):
                where = f"param group {g}, index {i}"
                names.append(f"parameter {given[i]!r} ({where})" if given else f"parameter ({where})")
        return names

    # -- the process group --------------------------------------------------------------------

    def _resolve(self) -> _Comm | None:
        """Bind to the process group on first use; ``None`` means single process."""
        if self._resolved:
            return self._comm
        world_size = group_size(self.process_group)
        if world_size == 1:
            # Not initialized yet: look again at the next round. World size 1: never.
            self._resolved = dist.is_available() and dist.is_initialized()
            return None
        params = self._params()
        check_ranks_agree(
            self.process_group,
            {"k": self.k, "bucket_cap_mb": self.bucket_cap_mb},
            [describe_tensor(p) for p in params],
            self._param_names(),
        )
        engine = BucketEngine(params, bucket_cap_bytes(self.bucket_cap_mb))
        self._comm = _Comm(self.process_group, world_size, engine)
        self._resolved = True
        return self._comm

    # -- stepping ---------------------------------------------------------------------------

    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        """Take one inner step; inside every ``k``-th call, then average parameters.

        Args:
            closure: re-evaluates the model and returns the loss (passed to the inner step).

        Returns:
            Whatever the inner optimizer's ``step`` returns (the closure's loss).
        """
        loss = self._inner_step(closure)
        self._num_steps += 1
        if self._schedule.averages_at(self._num_steps):
            self.sync()
        return loss

    def _inner_step(self, closure: Callable[[], float] | None) -> Any:
        found_inf = getattr(self, "found_inf", None)
        if found_inf is None:  # the common path: no GradScaler
            return self.optimizer.step(closure)
        grad_scale = getattr(self, "grad_scale", None)
        inner = self.optimizer
        if getattr(inner, "_step_supports_amp_scaling", False):
            inner.grad_scale, inner.found_inf = grad_scale, found_inf  # type: ignore[attr-defined]
            try:
                return inner.step(closure)
            finally:
                del inner.grad_scale, inner.found_inf  # type: ignore[attr-defined]
        if found_inf.item() != 0:
            return None  # GradScaler's verdict: skip the update (the step still counts)
        if grad_scale is not None:
            self._unscale_grads(grad_scale)
        return inner.step(closure)

    @torch.no_grad()
    def _unscale_grads(self, grad_scale: torch.Tensor) -> None:
        # Same arithmetic as GradScaler.unscale_: multiply by the fp32 reciprocal.
        inv_scale = grad_scale.double().reciprocal().float()
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for p in self._params():
            if p.grad is not None:
                grad = p.grad._values() if p.grad.is_sparse else p.grad
                by_device.setdefault(grad.device, []).append(grad)
        for device, grads in by_device.items():
            torch._foreach_mul_(grads, inv_scale.to(device))

    def sync(self) -> None:
        """Average parameters across ranks now (a collective: call it on every rank).

        Does not shift the schedule. A no-op in a single process.
        """
        comm = self._resolve()
        if comm is not None:
            comm.engine.all_reduce_mean(comm.group, comm.world_size)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset gradients through the inner optimizer (see :meth:`torch.optim.Optimizer.zero_grad`)."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to the inner optimizer; its parameters are averaged from the next round.

        Call it identically on every rank: the next averaging round re-checks that all
        ranks wrap the same parameters.
        """
        if not self._constructed:  # Optimizer.__init__ registering the inner groups
            super().add_param_group(param_group)
            return
        self.optimizer.add_param_group(param_group)
        self._comm, self._resolved = None, False

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus a versioned ``"local_sgd"`` entry.

        The entry holds only plain Python values, so ``torch.load(..., weights_only=True)``
        reads the whole checkpoint.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = self.optimizer.state_dict()
        state_dict[STATE_KEY] = {"version": STATE_VERSION, "num_steps": self._num_steps, "k": self.k}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` (or a plain optimizer's, with a warning).

        Restores the inner optimizer and the step count, so the schedule resumes at the
        exact phase it was saved in.
        """
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        entry = state_dict.pop(STATE_KEY, None)
        num_steps = _parse_entry(entry)  # validate before anything changes
        self.optimizer.load_state_dict(state_dict)
        self._share_inner()  # load_state_dict rebinds the inner param_groups and state
        self._num_steps = num_steps
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_comm"], state["_resolved"] = None, False  # process groups do not pickle
        return state

    def __repr__(self) -> str:
        inner = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        return (
            f"{type(self).__name__}(k={self.k}, num_steps={self._num_steps}, "
            f"bucket_cap_mb={self.bucket_cap_mb},\n{inner}\n)"
        )


def _parse_entry(entry: Any) -> int:
    """Validate the Local SGD entry of a state dict and return its step count."""
    if entry is None:
        warnings.warn(
            f"The state dict has no {STATE_KEY!r} entry (it was saved by a plain optimizer): "
            "loading the inner optimizer's state and starting the Local SGD step count at 0.",
            UserWarning,
            stacklevel=3,
        )
        return 0
    if not isinstance(entry, dict) or "version" not in entry:
        raise ValueError(
            f"state_dict[{STATE_KEY!r}] must be a dict with a 'version' key, got {entry!r}; "
            "pass a state dict produced by LocalSGDOptimizer.state_dict()"
        )
    version = entry["version"]
    if version != STATE_VERSION:
        raise ValueError(
            f"state_dict[{STATE_KEY!r}] has version {version!r}, but this localsgd_optim reads "
            f"version {STATE_VERSION}; upgrade localsgd_optim to load this checkpoint"
        )
    num_steps = entry.get("num_steps")
    if isinstance(num_steps, torch.Tensor) and num_steps.numel() == 1:
        num_steps = int(num_steps.item())
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(
            f"state_dict[{STATE_KEY!r}]['num_steps'] must be an integer >= 0, got {num_steps!r}"
        )
    return num_steps
