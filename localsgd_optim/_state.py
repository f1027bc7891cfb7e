"""The checkpoint format: the versioned ``"local_sgd"`` entry, and checks run before loading anything."""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch

__all__ = ["STATE_KEY", "STATE_VERSION", "parse_entry", "check_tensor_list", "check_optimizer_state"]

#: Key of the Local SGD entry inside the wrapped optimizer's state dict.
STATE_KEY = "local_sgd"
#: Version of that entry's format; bumped on any incompatible change.
STATE_VERSION = 1


def parse_entry(entry: Any) -> tuple[int, Any]:
    """Validate the Local SGD entry of a state dict; return its step count and saved ``k``."""
    if entry is None:
        warnings.warn(
            f"The state dict has no {STATE_KEY!r} entry (it was saved by a plain optimizer, or went "
            "through torch.distributed.checkpoint's get_optimizer_state_dict, which keeps only 'state' "
            "and 'param_groups'; use localsgd_optim.checkpoint instead): loading the inner optimizer's "
            "state and starting the Local SGD step count at 0.",
            UserWarning,
            stacklevel=4,
        )
        return 0, None
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
    return num_steps, entry.get("k")


def check_tensor_list(saved: Any, like: Sequence[torch.Tensor], what: str, fix: str) -> None:
    """Raise unless ``saved`` is a list of tensors shaped like ``like``, one per tensor."""
    if not isinstance(saved, (list, tuple)) or len(saved) != len(like) or any(
        not isinstance(s, torch.Tensor) or s.shape != t.shape for s, t in zip(saved, like)
    ):
        raise ValueError(f"state_dict[{STATE_KEY!r}][{what}] must hold {fix}")


def check_optimizer_state(saved: Any, optimizer: torch.optim.Optimizer, what: str) -> None:
    """The checks ``Optimizer.load_state_dict`` makes, made before anything is loaded."""
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(groups, (list, tuple)) or not isinstance(saved.get("state"), dict) or len(groups) != len(
        optimizer.param_groups
    ) or any(not isinstance(s, dict) or len(s.get("params", ())) != len(g["params"])
             for s, g in zip(groups, optimizer.param_groups)):
        raise ValueError(
            f"state_dict[{STATE_KEY!r}][{what}] must be a state dict of the same optimizer "
            f"({len(optimizer.param_groups)} param group(s) of "
            f"{[len(g['params']) for g in optimizer.param_groups]} tensors); pass a state dict saved "
            "by a LocalSGDOptimizer with the same model and settings"
        )
