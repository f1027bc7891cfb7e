"""Outer optimizers (DiLoCo, SlowMo): a global copy stepped with the averaged pseudo-gradient."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.optim import Optimizer

from ._buckets import BucketEngine, foreach_copy, layout_key
from ._flat import regions, strided_views
from ._state import check_optimizer_state, check_tensor_list

__all__ = ["OuterFactory", "OuterState", "flat_clone", "diloco", "slowmo"]

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


def flat_clone(tensors: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Copies of ``tensors`` laid out as flat storage lays them out: one buffer per (device, dtype).

    Returns the per-tensor views (with the tensors' strides; contiguous for a tensor that is
    not dense) and the buffers.
    """
    views: list[torch.Tensor] = [torch.empty(0)] * len(tensors)
    buffers = []
    with torch.no_grad():
        for region in regions(tensors):
            buffer = torch.empty(region.numel, device=region.device, dtype=region.dtype)
            buffers.append(buffer)
            for i, view in zip(region.indices, strided_views(buffer, region, tensors)):
                views[i] = view.copy_(tensors[i])
    return views, buffers


class OuterState:
    """The global parameters and the outer optimizer stepping them.

    A round: each parameter becomes, in place, its pseudo-gradient ``global - local``
    (:meth:`to_deltas`); the engine averages those; :meth:`apply` hands the mean to the
    outer optimizer as the global copy's ``.grad`` (aliased, not copied), steps it, and
    writes the global copy back into the parameters. With ``SGD(lr=1.0)`` the result is
    the plain average.
    """

    def __init__(self, params: Sequence[torch.Tensor], factory: OuterFactory) -> None:
        self.globals, self.flat = flat_clone(params)
        self.key = layout_key(params)
        self._matched: tuple | None = None  # the engine layout key last found to match ours
        self.optimizer = factory(self.globals)
        if not isinstance(self.optimizer, Optimizer):
            raise TypeError(
                "outer_optimizer must map a list of tensors to a torch.optim.Optimizer, e.g. "
                f"localsgd_optim.diloco(); it returned {type(self.optimizer).__name__}"
            )

    def flats(self, engine: BucketEngine | None) -> list[torch.Tensor] | None:
        """The parameters' flat storage, if it lines up with the global copy's element for element.

        Then the per-round work is one op per region instead of one ``_foreach`` over tensors.
        """
        found = engine.flats(len(self.globals)) if engine is not None else None
        if found is None:
            return None
        key, flats = found
        if key is not self._matched:
            if key != self.key:
                return None
            self._matched = key
        return flats

    @torch.no_grad()
    def reset(self, params: Sequence[torch.Tensor], engine: BucketEngine | None = None) -> None:
        """Take the current parameters as the global copy (after warmup, or at binding)."""
        flats = self.flats(engine)
        if flats is not None:
            foreach_copy(self.flat, flats)
        else:
            foreach_copy(self.globals, list(params))

    @torch.no_grad()
    def reset_params(self, params: Sequence[torch.Tensor], engine: BucketEngine | None = None) -> None:
        """Undo a failed round: put the global copy (identical on every rank) back in the model."""
        flats = self.flats(engine)
        if flats is not None:
            foreach_copy(flats, self.flat)
        else:
            foreach_copy(list(params), self.globals)

    @torch.no_grad()
    def to_deltas(self, params: Sequence[torch.Tensor], engine: BucketEngine | None = None) -> None:
        """Each parameter becomes, in place, its pseudo-gradient ``global - p``."""
        flats = self.flats(engine)
        if flats is not None:
            for g, p in zip(self.flat, flats):
                torch.sub(g, p, out=p)
            return
        params = list(params)
        torch._foreach_neg_(params)
        torch._foreach_add_(params, self.globals)  # p <- global - p, no allocation

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
    def apply(self, mean_deltas: Sequence[torch.Tensor], engine: BucketEngine | None = None) -> None:
        """Outer step, then the new global copy replaces the parameters (which held the means)."""
        self.step(mean_deltas)
        self.reset_params(mean_deltas, engine)

    @torch.no_grad()
    def mix_into(self, params: Sequence[torch.Tensor], weight: float, engine: BucketEngine | None = None) -> None:
        """``p <- p + weight * (global - p)``: keep ``1 - weight`` of the local progress."""
        flats = self.flats(engine)
        if flats is not None:
            for p, g in zip(flats, self.flat):
                p.lerp_(g, weight)
        else:
            torch._foreach_lerp_(list(params), self.globals, weight)

    def step_alone(self, params: Sequence[torch.Tensor]) -> None:
        """A round in a world of one: the mean pseudo-gradient is this worker's own."""
        params = list(params)
        self.to_deltas(params)
        self.apply(params)

    def check_compatible(self, params: Sequence[torch.Tensor], names: Sequence[str]) -> None:
        """The global copy must still match the parameters (a model moved after construction does not)."""
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
