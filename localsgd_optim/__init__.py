"""localsgd_optim: Local SGD for PyTorch, around any optimizer."""

from __future__ import annotations

from ._dist import (
    AveragingRoundError,
    LayoutMismatchError,
    LocalSGDError,
    NonFiniteParameterError,
    ScheduleMismatchError,
)
from .combined import Combined
from .compression import Compression, quantize, topk
from .ddp import no_sync
from ._outer import diloco, slowmo
from ._schedule import Schedule
from .optimizer import STATE_KEY, STATE_VERSION, LocalSGDOptimizer

__all__ = [
    "LocalSGDOptimizer",
    "Schedule",
    "diloco",
    "slowmo",
    "topk",
    "quantize",
    "Compression",
    "Combined",
    "no_sync",
    "LocalSGDError",
    "LayoutMismatchError",
    "ScheduleMismatchError",
    "AveragingRoundError",
    "NonFiniteParameterError",
    "STATE_KEY",
    "STATE_VERSION",
]
__version__ = "0.1.0"
