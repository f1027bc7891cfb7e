"""Outer optimizers (DiLoCo, SlowMo): a global copy stepped with the averaged pseudo-gradient."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.optim import Optimizer

from ._buckets import foreach_copy
from ._flat import Layout, rebase
from ._state import check_optimizer_state, check_tensor_list

__all__ = ["OuterFactory", "OuterState", "check_trainable_count", "diloco", "slowmo"]

#: Builds the outer optimizer over the global copies of the parameters.
OuterFactory = Callable[[list[torch.Tensor]], Optimizer]


def diloco(lr: float = 0.7, momentum: float = 0.9) -> OuterFactory:
    """DiLoCo's outer optimizer: Nesterov SGD on the pseudo-gradient (plain SGD at ``momentum=0``).

    Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language Models"
    (2023, https://arxiv.org/abs/2311.08105), use lr 0.7 and momentum 0.9 with AdamW inside.
    """
    _check_momentum("diloco", momentum, "DiLoCo uses 0.9")
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0)


def slowmo(lr: float = 1.0, momentum: float = 0.5) -> OuterFactory:
    """SlowMo's outer update: heavy-ball momentum on the pseudo-gradient.

    Wang et al., "SlowMo: Improving Communication-Efficient Distributed SGD with Slow
    Momentum" (ICLR 2020, https://arxiv.org/abs/1910.00643): slow learning rate ``lr``
    (their alpha; the inner-LR scaling of their formulation folded in) and slow momentum
    ``momentum`` (their beta).
    """
    _check_momentum("slowmo", momentum, "SlowMo uses 0.5 to 0.8")
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum)


def _check_momentum(preset: str, momentum: float, usual: str) -> None:
    if not 0 <= momentum < 1:
        raise ValueError(f"{preset}(momentum={momentum!r}): the outer momentum must be in [0, 1); "
                         f"{usual}, and 0 gives plain outer SGD")


def check_trainable_count(built_for: int, now: int) -> None:
    """Per-parameter state built for ``built_for`` parameters cannot serve ``now`` (frozen or unfrozen since)."""
    if now != built_for:
        raise ValueError(
            f"the number of trainable (requires_grad=True) parameters changed from {built_for} to {now} since "
            "construction; outer_optimizer, compression, overlap_steps and fragments keep per-parameter state "
            "(a global copy, fragment bounds) and need that set fixed: construct LocalSGDOptimizer after "
            "freezing or unfreezing parameters"
        )


class OuterState:
    """The global parameters and the outer optimizer stepping them, on the flat layout.

    A round (:class:`~localsgd_optim.rounds.outer.OuterRound`) works on the parameters' flat
    slices (``flats``: the engine's storage, or the copy engine's staging copy): each becomes,
    in place, its pseudo-gradient ``global - local`` (:meth:`to_deltas`: one op per flat
    buffer); the engine averages those; :meth:`apply` hands the mean to the outer optimizer as
    the global copy's ``.grad`` (views, not copies), steps it, and writes the global copy back.
    With ``SGD(lr=1.0)`` the result is the plain average. The global copy is laid out like the
    engine's slices (:meth:`follow` re-lays it out if they differ), so every operation is one
    op per buffer, and parameters that share memory are computed on once.

    Args:
        params: the parameters (a fragment's, for streaming rounds).
        factory: builds the outer optimizer over the global copies.
        flat_params: lay the copy out as flat storage will (strides kept), or as the copy engine's
            staging copy (contiguous slots).
    """

    def __init__(self, params: Sequence[torch.Tensor], factory: OuterFactory, flat_params: bool = True) -> None:
        layout = Layout(params, [flat_params] * len(params))
        self.flat = layout.allocate()
        self.globals = layout.views(self.flat)
        with torch.no_grad():
            foreach_copy(self.globals, list(params))
        self.globals = [g.detach() for g in self.globals]
        self.key = layout.key(0, len(params))
        self.optimizer = factory(self.globals)
        if not isinstance(self.optimizer, Optimizer):
            raise TypeError(
                "outer_optimizer must map a list of tensors to a torch.optim.Optimizer, e.g. "
                f"localsgd_optim.diloco(); it returned {type(self.optimizer).__name__}"
            )

    @torch.no_grad()
    def follow(self, key: tuple, flats: Sequence[torch.Tensor], views: Sequence[torch.Tensor]) -> None:
        """Lay the global copy out like ``flats`` (the engine's slices, ``views`` its tensors' views in
        them), unless it already is. The global tensors keep their identity (the outer optimizer's
        parameters): only their ``.data`` moves."""
        if key == self.key:
            return
        new = [torch.empty_like(f) for f in flats]
        for g, view in zip(self.globals, rebase(views, flats, new)):
            view.copy_(g)
            g.data = view
        self.flat, self.key = new, key

    @torch.no_grad()
    def take(self, params: Sequence[torch.Tensor]) -> None:
        """Take the parameters, tensor by tensor, as the global copy (not bound yet, or a checkpoint
        without outer state)."""
        foreach_copy(self.globals, list(params))

    @torch.no_grad()
    def reset(self, flats: Sequence[torch.Tensor]) -> None:
        """Take the parameters' flat slices as the global copy (after warmup, or at binding)."""
        foreach_copy(self.flat, list(flats))

    @torch.no_grad()
    def reset_params(self, flats: Sequence[torch.Tensor]) -> None:
        """Write the global copy (identical on every rank) into the parameters' flat slices."""
        foreach_copy(list(flats), self.flat)

    @torch.no_grad()
    def to_deltas(self, flats: Sequence[torch.Tensor], out: Sequence[torch.Tensor] | None = None) -> None:
        """``global - p`` per flat buffer, in place (or into ``out``, laid out alike)."""
        for g, p, o in zip(self.flat, flats, flats if out is None else out):
            torch.sub(g, p, out=o)

    def step(self, mean_deltas: Sequence[torch.Tensor]) -> None:
        """One outer step with the mean pseudo-gradients (per tensor) as the global copy's ``.grad``."""
        for g, d in zip(self.globals, mean_deltas):
            g.grad = d.detach()
        try:
            self.optimizer.step()
        finally:
            for g in self.globals:
                g.grad = None

    @torch.no_grad()
    def apply(self, flats: Sequence[torch.Tensor], mean_deltas: Sequence[torch.Tensor]) -> None:
        """Outer step, then the new global copy replaces the parameters' flat slices (which held the means).

        A plain average (``SGD(lr=1.0)``, nothing else: :func:`_subtracts`) is one ``sub_`` per flat buffer:
        SGD's ``p.add_(g, alpha=-1.0)`` is ``p - g`` rounded once, element by element, the same bits."""
        if _subtracts(self.optimizer):
            for g, mean in zip(self.flat, flats):
                g.sub_(mean)
        else:
            self.step(mean_deltas)
        self.reset_params(flats)

    @torch.no_grad()
    def mix_into(self, flats: Sequence[torch.Tensor], weight: float) -> None:
        """``p <- p + weight * (global - p)``: keep ``1 - weight`` of the local progress."""
        for p, g in zip(flats, self.flat):
            p.lerp_(g, weight)

    def step_alone(self, params: Sequence[torch.Tensor]) -> None:
        """A round in a world of one: the mean pseudo-gradient is this worker's own."""
        params = list(params)
        with torch.no_grad():
            deltas = torch._foreach_sub(self.globals, params) if params else []
        self.step(deltas)
        with torch.no_grad():
            foreach_copy(params, self.globals)

    def check_compatible(self, params: Sequence[torch.Tensor], names: Sequence[str]) -> None:
        """The global copy must still match the parameters (a model moved after construction does not,
        nor a parameter frozen or unfrozen since: the global copy holds the trainable ones)."""
        check_trainable_count(len(self.globals), len(params))
        for name, g, p in zip(names, self.globals, params):
            if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
                raise ValueError(
                    f"{name} is now {p.dtype}{list(p.shape)} on {p.device} but the outer optimizer's global "
                    f"copy is {g.dtype}{list(g.shape)} on {g.device}: move or cast the model before "
                    "constructing LocalSGDOptimizer with an outer_optimizer or compression"
                )

    def state_dict(self) -> dict[str, Any]:
        return {"global": list(self.globals), "optimizer": self.optimizer.state_dict()}

    def check_state(self, state: Any) -> None:
        """Raise unless ``state`` (from :meth:`state_dict`) loads into this outer state."""
        check_tensor_list(
            state.get("global") if isinstance(state, dict) else None, self.globals, "'outer'",
            f"a 'global' list with one tensor per parameter ({len(self.globals)}, same shapes); pass a "
            "state dict saved by a LocalSGDOptimizer with the same model and an outer_optimizer",
        )
        check_optimizer_state(state.get("optimizer"), self.optimizer, "'outer']['optimizer'")

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` saved (checked by :meth:`check_state` first)."""
        foreach_copy(self.globals, [s.to(g.device, g.dtype) for s, g in zip(state["global"], self.globals)])
        self.optimizer.load_state_dict(state["optimizer"])


def _subtracts(optimizer: Optimizer) -> bool:
    """Its step is ``p -= grad`` exactly: a ``torch.optim.SGD`` with one group at ``lr=1.0`` (a number),
    no momentum, weight decay, maximize or ``fused`` (its own kernels), and nothing that skipping ``step()`` would skip: no step
    hooks (its own or global), no ``step`` wrapped on the instance (an LR scheduler counts calls)."""
    from torch.optim import optimizer as module

    if type(optimizer) is not torch.optim.SGD or len(optimizer.param_groups) != 1:
        return False
    group = optimizer.param_groups[0]
    hooks = (optimizer._optimizer_step_pre_hooks, optimizer._optimizer_step_post_hooks,
             getattr(module, "_global_optimizer_pre_hooks", None),
             getattr(module, "_global_optimizer_post_hooks", None))
    return (type(group["lr"]) in (int, float) and group["lr"] == 1.0 and group["momentum"] == 0
            and group["weight_decay"] == 0 and not group["maximize"] and not group.get("fused") and not any(hooks)
            and "step" not in vars(optimizer))
