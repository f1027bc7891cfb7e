"""Several optimizers over disjoint parameters, stepped as one (Muon for the matrices, AdamW for the rest)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Callable

import torch
from torch.optim import Optimizer

__all__ = ["Combined"]


class _MergedState(Mapping):
    """A live, read-only view of the parts' ``state`` dicts (each parameter is in one part)."""

    def __init__(self, parts: list[Optimizer]) -> None:
        self._parts = parts

    def __getitem__(self, param: torch.Tensor) -> Any:
        for part in self._parts:
            if param in part.state:
                return part.state[param]
        raise KeyError(param)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for part in self._parts:
            yield from part.state

    def __len__(self) -> int:
        return sum(len(part.state) for part in self._parts)


class Combined(Optimizer):
    """Step several optimizers over disjoint parameters as one optimizer.

    ``torch.optim.Muon`` takes 2-D parameters only; the rest need another optimizer (its docs:
    AdamW). ``Combined(Muon(matrices), AdamW(rest))`` is one optimizer, so one
    :class:`~localsgd_optim.LocalSGDOptimizer` averages the whole model in one round (one set of
    buckets), and one LR scheduler drives both (``param_groups`` are the parts' own groups, so a
    scheduler's writes reach them). ``state_dict()`` holds each part's state dict in order.

    Args:
        *optimizers: the parts, in a fixed order (every rank the same), no parameter in two.
    """

    def __init__(self, *optimizers: Optimizer) -> None:
        if not optimizers:
            raise ValueError("Combined needs at least one optimizer, got none")
        for i, part in enumerate(optimizers):
            if not isinstance(part, Optimizer) or isinstance(part, Combined):
                raise TypeError(
                    f"Combined: argument {i} must be a torch.optim.Optimizer (not a Combined), "
                    f"got {type(part).__name__}"
                )
        seen: dict[int, int] = {}
        for i, part in enumerate(optimizers):
            for group in part.param_groups:
                for p in group["params"]:
                    if id(p) in seen:
                        raise ValueError(
                            f"Combined: a parameter of shape {tuple(p.shape)} is in optimizers {seen[id(p)]} and "
                            f"{i}; give each parameter to one optimizer"
                        )
                    seen[id(p)] = i
        self.optimizers = list(optimizers)
        self._binding = True
        super().__init__([p for part in optimizers for g in part.param_groups for p in g["params"]], {})
        self._binding = False
        self.param_groups = [g for part in self.optimizers for g in part.param_groups]
        self.state = _MergedState(self.optimizers)  # type: ignore[assignment]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self._binding:
            super().add_param_group(param_group)
            return
        raise NotImplementedError(
            "Combined.add_param_group: add the group to the part it belongs to, before building Combined"
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self.optimizers:
            part.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.optimizers:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"combined": [part.state_dict() for part in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        parts = state_dict.get("combined") if isinstance(state_dict, dict) else None
        if not isinstance(parts, (list, tuple)) or len(parts) != len(self.optimizers):
            got = f"{len(parts)} parts" if isinstance(parts, (list, tuple)) else f"keys {sorted(map(str, state_dict))}"
            raise ValueError(
                f"Combined.load_state_dict: expected {{'combined': [one state dict per optimizer "
                f"({len(self.optimizers)})]}}, got {got}; load a state dict saved by the same Combined"
            )
        for part, saved in zip(self.optimizers, parts):
            part.load_state_dict(saved)
