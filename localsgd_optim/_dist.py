"""Process-group plumbing: which group to use, and checks that all its ranks agree."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

__all__ = ["group_size", "check_ranks_agree", "LayoutMismatchError"]


class LayoutMismatchError(RuntimeError):
    """Raised on every rank when ranks wrap different parameters or settings."""


def group_size(group: dist.ProcessGroup | None) -> int:
    """World size of ``group``, or 1 when torch.distributed is not initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def describe_tensor(t: torch.Tensor) -> tuple[str, str, tuple[int, ...]]:
    return (t.device.type, str(t.dtype).removeprefix("torch."), tuple(t.shape))


def _fmt(entry: tuple[str, str, tuple[int, ...]] | None) -> str:
    if entry is None:
        return "missing"
    device, dtype, shape = entry
    return f"{dtype}{list(shape)} on {device}"


def check_ranks_agree(
    group: dist.ProcessGroup | None,
    settings: dict[str, Any],
    layout: Sequence[tuple[str, str, tuple[int, ...]]],
    names: Sequence[str],
) -> None:
    """Gather every rank's settings and tensor layout; raise on every rank if any differ.

    One ``all_gather_object`` carries both, so every rank sees every other rank's
    view and reaches the same verdict: the error is raised everywhere, never on one
    rank while the others wait in a collective.

    Args:
        group: the process group to check.
        settings: values every rank must share (e.g. ``k``, ``bucket_cap_mb``).
        layout: (device type, dtype, shape) of each averaged tensor, in order.
        names: a human-readable name for each tensor, used in the error message.
    """
    mine = {"settings": dict(settings), "layout": list(layout), "names": list(names)}
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    ref = everyone[0]
    for rank, theirs in enumerate(everyone[1:], start=1):
        for key in ref["settings"]:
            if ref["settings"][key] != theirs["settings"].get(key):
                raise LayoutMismatchError(
                    f"LocalSGDOptimizer: ranks disagree on {key}: rank 0 has "
                    f"{ref['settings'][key]!r}, rank {rank} has {theirs['settings'].get(key)!r}. "
                    f"Pass the same {key} on every rank."
                )
        a, b = ref["layout"], theirs["layout"]
        if a == b:
            continue
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        # Name it from a rank that has it, so every rank prints the very same message.
        owner = ref if first < len(ref["names"]) else theirs
        name = owner["names"][first]
        raise LayoutMismatchError(
            "LocalSGDOptimizer: ranks wrap different parameters "
            f"(rank 0 has {len(a)}, rank {rank} has {len(b)}); the first difference is "
            f"{name}: {_fmt(a[first] if first < len(a) else None)} on rank 0, "
            f"{_fmt(b[first] if first < len(b) else None)} on rank {rank}. Build the model and "
            "optimizer identically on every rank (same modules, same parameter order)."
        )
