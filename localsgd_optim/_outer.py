"""Outer optimizers (DiLoCo, SlowMo): a global copy stepped with the averaged pseudo-gradient."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.optim import Optimizer

from ._buckets import _foreach_copy

__all__ = ["OuterFactory", "OuterState", "diloco", "slowmo"]

#: Builds the outer optimizer over the global copies of the parameters.
OuterFactory = Callable[[list[torch.Tensor]], Optimizer]


def diloco(lr: float = 0.7, momentum: float = 0.9) -> OuterFactory:
    """DiLoCo's outer optimizer: Nesterov SGD on the pseudo-gradient.

    Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language Models"
    (2023, https://arxiv.org/abs/2311.08105), use lr 0.7 and momentum 0.9 with AdamW inside.
    """
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True)


def slowmo(lr: float = 1.0, momentum: float = 0.5) -> OuterFactory:
    """SlowMo's outer update: heavy-ball momentum on the pseudo-gradient.

    Wang et al., "SlowMo: Improving Communication-Efficient Distributed SGD with Slow
    Momentum" (ICLR 2020, https://arxiv.org/abs/1910.00643): slow learning rate ``lr``
    (their alpha; the inner-LR scaling of their formulation folded in) and slow momentum
    ``momentum`` (their beta).
    """
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum)


class OuterState:
    """The global parameters and the outer optimizer stepping them.

    A round: each parameter becomes, in place, its pseudo-gradient ``global - local``
    (:meth:`to_deltas`); the engine averages those; :meth:`apply` hands the mean to the
    outer optimizer as the global copy's ``.grad`` (aliased, not copied), steps it, and
    writes the global copy back into the parameters. With ``SGD(lr=1.0)`` the result is
    the plain average.
    """

    def __init__(self, params: Sequence[torch.Tensor], factory: OuterFactory) -> None:
        self.globals = [p.detach().clone() for p in params]
        self.optimizer = factory(self.globals)
        if not isinstance(self.optimizer, Optimizer):
            raise TypeError(
                "outer_optimizer must map a list of tensors to a torch.optim.Optimizer, e.g. "
                f"localsgd_optim.diloco(); it returned {type(self.optimizer).__name__}"
            )

    @torch.no_grad()
    def reset(self, params: Sequence[torch.Tensor]) -> None:
        """Take the current parameters as the global copy (after warmup, or at binding)."""
        _foreach_copy(self.globals, list(params))

    @torch.no_grad()
    def reset_params(self, params: Sequence[torch.Tensor]) -> None:
        """Undo a failed round: put the global copy (identical on every rank) back in the model."""
        _foreach_copy(list(params), self.globals)

    @torch.no_grad()
    def to_deltas(self, params: Sequence[torch.Tensor]) -> None:
        params = list(params)
        torch._foreach_neg_(params)
        torch._foreach_add_(params, self.globals)  # p <- global - p, no allocation

    @torch.no_grad()
    def step(self, mean_deltas: Sequence[torch.Tensor]) -> None:
        """One outer step with the mean pseudo-gradients as the global copy's ``.grad``."""
        for g, d in zip(self.globals, mean_deltas):
            g.grad = d.detach()
        try:
            self.optimizer.step()
        finally:
            for g in self.globals:
                g.grad = None

    @torch.no_grad()
    def apply(self, mean_deltas: Sequence[torch.Tensor]) -> None:
        """Outer step, then the new global copy replaces the parameters (which held the means)."""
        self.step(mean_deltas)
        _foreach_copy(list(mean_deltas), self.globals)

    def state_dict(self) -> dict[str, Any]:
        return {"global": list(self.globals), "optimizer": self.optimizer.state_dict()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("global") if isinstance(state, dict) else None
        if not isinstance(saved, (list, tuple)) or len(saved) != len(self.globals) or any(
            not isinstance(s, torch.Tensor) or s.shape != g.shape for s, g in zip(saved, self.globals)
        ):
            raise ValueError(
                "state_dict['local_sgd']['outer'] must hold a 'global' list with one tensor per "
                f"parameter ({len(self.globals)}, same shapes); pass a state dict saved by a "
                "LocalSGDOptimizer with the same model and an outer_optimizer"
            )
        _foreach_copy(self.globals, [s.to(g.device, g.dtype) for s, g in zip(saved, self.globals)])
        self.optimizer.load_state_dict(state["optimizer"])
