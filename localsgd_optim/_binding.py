"""Binding to a process group, and the control collective that opens every round."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from ._buckets import BucketEngine, bucket_cap_bytes
from ._dist import (
    AveragingRoundError,
    LocalSGDError,
    RoundKind,
    agree_on_round,
    check_ranks_agree,
    describe_tensor,
    fingerprint,
)

__all__ = ["Members", "Binding"]


def _averaged(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


class Members:
    """What a round averages, read afresh each time: the parameters, then floating buffers.

    Parameters that are not floating-point (an ``int64`` counter with ``requires_grad=False``,
    which torch's optimizers and DDP accept) are left alone, as integer buffers are; they still
    count in the cross-rank layout check.

    Args:
        owner: the optimizer whose current ``param_groups`` and ``state`` are read (``load_state_dict``
            rebinds them).
        buffers_module: the module whose floating-point buffers are averaged too, or ``None``.
        optimizer_state: the inner optimizer's per-parameter state is averaged too (in its own
            engine: see :meth:`optimizer_state`); it joins the cross-rank layout check.
    """

    def __init__(self, owner: Any, buffers_module: nn.Module | None, optimizer_state: bool = False) -> None:
        self._owner = owner
        self.buffers_module = buffers_module
        self.averages_optimizer_state = optimizer_state

    @property
    def dynamic(self) -> bool:
        """Whether the layout can change between rounds without the tensors moving (state appears)."""
        return self.averages_optimizer_state

    def optimizer_state(self) -> list[tuple[str, torch.Tensor]]:
        """The inner optimizer's floating per-parameter state shaped like its parameter (Adam's
        moments, SGD's momentum buffer), in parameter then key order; never ``step``."""
        if not self.averages_optimizer_state:
            return []
        state, out = self._owner.state, []
        for name, p in zip(self.param_names(), self.params()):
            for key, value in sorted(state.get(p, {}).items()):
                if (key != "step" and isinstance(value, torch.Tensor) and value.shape == p.shape
                        and (value.is_floating_point() or value.is_complex())):
                    out.append((f"optimizer state {key!r} of {name}", value))
        return out

    def _named_params(self) -> list[tuple[str, torch.Tensor]]:
        out = []
        for g, group in enumerate(self._owner.param_groups):
            given = group.get("param_names")
            for i, p in enumerate(group["params"]):
                where = f"param group {g}, index {i}"
                out.append((f"parameter {given[i]!r} ({where})" if given else f"parameter ({where})", p))
        return out

    def params(self) -> list[torch.Tensor]:
        """The parameters averaged: every floating-point (or complex) one, in ``param_groups`` order."""
        return [p for group in self._owner.param_groups for p in group["params"] if _averaged(p)]

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
        return [n for n, p in self._named_params() if _averaged(p)]

    def names(self) -> list[str]:
        """Names lined up with :meth:`tensors` (then the optimizer state, when averaged)."""
        names = self.param_names() + [f"buffer {n!r}" for n, _ in self.buffers()]
        if self.averages_optimizer_state:  # after everything the engine averages: indices still line up
            names += [n for n, _ in self.optimizer_state()]
        return names

    def layout_names(self) -> list[str]:
        """Names lined up with :meth:`layout`: every parameter, averaged or not."""
        return [n for n, _ in self._named_params()] + self.names()[len(self.param_names()):]

    def layout(self) -> list[tuple]:
        """Device, dtype and shape per tensor, and the parameters' strides: flat storage and the
        global copy keep a parameter's memory order, so ranks must agree on it for their buckets
        to line up element for element. Every parameter counts, averaged or not."""
        return [describe_tensor(t) + (tuple(t.stride()),) for _, t in self._named_params()] + \
            [describe_tensor(b) for _, b in self.buffers()] + [describe_tensor(s) for _, s in self.optimizer_state()]

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
    """

    def __init__(self, group: dist.ProcessGroup | None, world_size: int, members: Members,
                 settings: Callable[[], dict[str, Any]], bucket_cap_mb: float, flat_params: bool = True) -> None:
        members.check_averageable()  # local and before any collective: every rank raises alike
        tensors = members.tensors()
        self.group = group
        self.world_size = world_size
        self.members = members
        self.settings = settings
        self.flat_params = flat_params
        self.engine = BucketEngine(tensors, bucket_cap_bytes(bucket_cap_mb), flat_params, len(members.params()))
        nccl = dist.get_backend(group) == "nccl"
        # NCCL needs the tiny control tensor on the GPU
        self.control_device = tensors[0].device if nccl and tensors else torch.device("cpu")
        self.digest = self._digest()

    def _digest(self) -> int:
        return fingerprint(self.settings(), self.members.layout())

    def _explain_layout(self) -> None:
        check_ranks_agree(self.group, self.settings(), self.members.layout(), self.members.layout_names())

    def control(self, kind: RoundKind, num_steps: int, start_steps: int, prepare: Callable[[], None],
                check_finite: bool, joined: bool = False, group: Any = None) -> int:
        """Prepare locally, then run the round's control collective; return how many ranks send data.

        Everything that can fail locally (re-planning, ``prepare``, the NaN scan) happens before
        the gather, and a failure is announced in it: no rank is ever left waiting in a data
        collective, and a disagreement raises on every rank before any data moves.
        """
        nonfinite, local_error = -1, None
        try:
            if self.engine.refresh(self.members.tensors()) or self.members.dynamic:  # moved, rebound, new state
                self.digest = self._digest()
            prepare()
            if check_finite and kind != RoundKind.BIND and not joined:
                nonfinite = self.engine.first_nonfinite()
        except Exception as e:  # noqa: BLE001 - re-raised on this rank right after the gather
            local_error = e
        return agree_on_round(self.group if group is None else group, self.control_device, kind, num_steps,
                              start_steps, self.digest, self._explain_layout, nonfinite, self.members.names,
                              joined, local_error)

    @contextlib.contextmanager
    def errors(self, what: str) -> Iterator[None]:
        """Re-raise a communication failure as AveragingRoundError saying which round; pass the rest."""
        try:
            yield
        except (LocalSGDError, torch.OutOfMemoryError, NotImplementedError):
            raise
        except RuntimeError as e:  # gloo/NCCL errors: a dead peer, a broken link, a timeout
            raise AveragingRoundError(
                f"LocalSGDOptimizer: {what} failed on rank {dist.get_rank(self.group)} of {self.world_size}: "
                f"{type(e).__name__}: {e}. If a rank died, restart the job from the last checkpoint "
                "(see docs/failure-modes.md)."
            ) from e
