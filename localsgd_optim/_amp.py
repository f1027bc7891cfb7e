"""The inner step under ``torch.amp.GradScaler``, which hands the wrapper ``grad_scale``/``found_inf``."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.optim import Optimizer

__all__ = ["inner_step"]


def inner_step(wrapper: Optimizer, inner: Optimizer, closure: Callable[[], float] | None) -> Any:
    """Step ``inner`` as ``GradScaler`` asked the wrapper to: skip, unscale, or pass the verdict on.

    ``GradScaler`` sets ``grad_scale`` and ``found_inf`` on an optimizer that declares
    ``_step_supports_amp_scaling`` and always calls ``step()``, so a skipped step still counts.
    An inner optimizer that supports the protocol itself (fused Adam) gets them handed on;
    any other is skipped on inf/NaN gradients, or steps on gradients unscaled here.
    """
    found_inf = getattr(wrapper, "found_inf", None)
    if found_inf is None:  # the common path: no GradScaler
        return inner.step(closure)
    grad_scale = getattr(wrapper, "grad_scale", None)
    if getattr(inner, "_step_supports_amp_scaling", False):
        inner.grad_scale, inner.found_inf = grad_scale, found_inf  # type: ignore[attr-defined]
        try:
            return inner.step(closure)
        finally:
            del inner.grad_scale, inner.found_inf  # type: ignore[attr-defined]
    if found_inf.item() != 0:
        return None  # GradScaler's verdict: skip the update (the step still counts)
    if grad_scale is not None:
        _unscale_grads(inner, grad_scale)
    return inner.step(closure)


@torch.no_grad()
def _unscale_grads(inner: Optimizer, grad_scale: torch.Tensor) -> None:
    # Same arithmetic as GradScaler.unscale_: multiply by the fp32 reciprocal.
    inv_scale = grad_scale.double().reciprocal().float()
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for group in inner.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                grad = p.grad._values() if p.grad.is_sparse else p.grad
                by_device.setdefault(grad.device, []).append(grad)
    for device, grads in by_device.items():
        torch._foreach_mul_(grads, inv_scale.to(device))
