"""torch.distributed.checkpoint (DCP) for Local SGD: every rank's own state, saved and loaded exactly.

Two things stop DCP's own helpers from checkpointing a Local SGD run exactly:

- ``get_optimizer_state_dict`` keeps only ``"state"`` and ``"param_groups"``, so the
  optimizer's ``"local_sgd"`` entry (step count, outer state) is dropped;
- DCP treats a plain tensor saved under the same key on every rank as replicated and writes
  one copy. With Local SGD each rank's inner optimizer state (Adam moments) is its own, and
  mid-period so are its weights: a reload would give every rank rank 0's.

:func:`get_state_dict` builds each rank's state under its own key (``"rank<r>"``), with
model and inner-optimizer entries made by DCP's helpers (FQN-keyed) and the Local SGD entry
beside them; :func:`set_state_dict` loads it back. The usual DCP pattern::

    from localsgd_optim import checkpoint as lsgd_ckpt
    import torch.distributed.checkpoint as dcp

    dcp.save({"train": lsgd_ckpt.get_state_dict(model, opt)}, checkpoint_id=path)
    ...
    state = {"train": lsgd_ckpt.get_state_dict(model, opt)}  # the template DCP loads into
    dcp.load(state, checkpoint_id=path)
    lsgd_ckpt.set_state_dict(model, opt, state["train"])

A checkpoint holds ``world_size`` copies of weights and optimizer state, keyed by global
rank; it reloads at the same world size. A smaller world raises a ``ValueError`` on every
rank in :func:`set_state_dict`; a larger one fails earlier, in ``dcp.load``, with DCP's
"Missing key in checkpoint state_dict: train.rank<r>...". The Local SGD entry (with any
outer-optimizer state) is one serialized blob per rank: DCP loads only the keys its template
has, and the outer optimizer's state only exists after its first step.
"""

from __future__ import annotations

import io
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ._state import STATE_KEY
from .optimizer import LocalSGDOptimizer

__all__ = ["get_state_dict", "set_state_dict"]


def get_state_dict(model: nn.Module, optimizer: LocalSGDOptimizer) -> dict[str, Any]:
    """This rank's weights, inner optimizer state and Local SGD state, keyed by its rank."""
    rank, world = _rank_and_world(optimizer)
    mine = {
        "model": get_model_state_dict(model),
        "optimizer": get_optimizer_state_dict(model, optimizer.optimizer),
        # One blob: DCP loads only the keys a template has; outer state appears after a round.
        STATE_KEY: _to_bytes(optimizer.state_dict()[STATE_KEY]),
    }
    return {"world_size": world, f"rank{rank}": mine}


def set_state_dict(model: nn.Module, optimizer: LocalSGDOptimizer, state: dict[str, Any]) -> None:
    """Load what :func:`get_state_dict` made (after ``dcp.load`` filled it in)."""
    rank, world = _rank_and_world(optimizer)
    saved_world = state.get("world_size")
    if saved_world != world:  # the same value on every rank, so every rank raises
        raise ValueError(
            f"the checkpoint was saved by {saved_world} ranks, this run has {world}; a Local SGD "
            "checkpoint holds one state per rank: resume at the same world size"
        )
    mine = state[f"rank{rank}"]
    entry = torch.load(io.BytesIO(mine[STATE_KEY]), weights_only=True)

    def load_model_and_inner() -> None:  # after the entry is validated: nothing changes on a bad one
        set_model_state_dict(model, mine["model"])
        set_optimizer_state_dict(model, optimizer.optimizer, mine["optimizer"])

    optimizer.load_local_sgd_entry(entry, load_model_and_inner)


def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _rank_and_world(optimizer: LocalSGDOptimizer) -> tuple[int, int]:
    if not isinstance(optimizer, LocalSGDOptimizer):
        raise TypeError(f"optimizer must be a LocalSGDOptimizer, got {type(optimizer).__name__}")
    if not dist.is_initialized():
        return 0, 1
    # Global ranks: with subgroups, two processes share a group rank and DCP would keep one.
    return dist.get_rank(), dist.get_world_size()
