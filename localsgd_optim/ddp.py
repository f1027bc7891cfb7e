"""``no_sync``: keep DDP from all-reducing gradients during local steps."""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import torch

__all__ = ["no_sync", "scheduled_no_sync", "warn_if_buffers_synced"]


def warn_if_buffers_synced(module: torch.nn.Module) -> None:
    """Warn when a DDP module syncs its buffers from rank 0 on every forward."""
    # torch >= 2.13 calls it forward_sync_buffers; older versions broadcast_buffers.
    syncs = getattr(module, "forward_sync_buffers", getattr(module, "broadcast_buffers", False))
    if syncs and any(True for _ in module.buffers()):
        warnings.warn(
            "This DDP module syncs its buffers from rank 0 in every forward "
            "(forward_sync_buffers=True, called broadcast_buffers before torch 2.13): a collective "
            "on each step that defeats Local SGD. Construct DistributedDataParallel(..., "
            "forward_sync_buffers=False) (or broadcast_buffers=False on older torch), and pass "
            "buffers=model to LocalSGDOptimizer to average them at its rounds instead.",
            UserWarning,
            stacklevel=4,
        )


@contextlib.contextmanager
def no_sync(module: torch.nn.Module) -> Iterator[None]:
    """Turn off DDP's gradient all-reduce for every backward run inside the block.

    For a :class:`~torch.nn.parallel.DistributedDataParallel` module this is its own
    ``no_sync()``; for any other module it does nothing, so one training loop serves
    both. Wrap the whole loop or a single backward. Warns when the DDP module
    syncs buffers on every forward (``forward_sync_buffers``/``broadcast_buffers`` with buffers), a
    per-step collective that defeats Local SGD.

    Args:
        module: the (possibly DDP-wrapped) model.

    Example::

        >>> model = torch.nn.Linear(2, 1)
        >>> with no_sync(model):
        ...     model(torch.ones(1, 2)).sum().backward()
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}: {module!r}")
    warn_if_buffers_synced(module)
    with getattr(module, "no_sync", contextlib.nullcontext)():
        yield


@contextlib.contextmanager
def scheduled_no_sync(module: torch.nn.Module, registry: list[torch.nn.Module], sync_now: bool) -> Iterator[None]:
    """``LocalSGDOptimizer.no_sync``: a DDP module's gradient sync, switched by the optimizer's schedule.

    While the block runs, ``module`` sits in ``registry`` (the optimizer turns its
    ``require_backward_grad_sync`` off when warmup ends) and starts with sync ``sync_now``.
    Any other module is left alone.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}: {module!r}")
    if not hasattr(module, "require_backward_grad_sync"):  # not DDP
        yield
        return
    warn_if_buffers_synced(module)
    previous = module.require_backward_grad_sync
    registry.append(module)
    module.require_backward_grad_sync = sync_now
    try:
        yield
    finally:
        registry.remove(module)
        module.require_backward_grad_sync = previous
