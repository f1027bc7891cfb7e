"""PyTorch Lightning: one callback stops DDP's per-step gradient all-reduce for Local SGD.

Lightning's ``strategy="ddp"`` wraps the model in DDP, which all-reduces gradients in every
backward. With Local SGD that is wasted traffic (and makes the averaging a no-op), so add
:class:`LocalSGDCallback` to the trainer::

    trainer = Trainer(strategy="ddp", callbacks=[LocalSGDCallback()])

It finds the :class:`~localsgd_optim.LocalSGDOptimizer` that ``configure_optimizers``
returned and holds :meth:`LocalSGDOptimizer.no_sync` on the DDP module for the whole fit,
so ``warmup_steps`` keeps the all-reduce on while warming up.

Checkpoints: Lightning writes rank 0's ``optimizer.state_dict()`` (which carries the Local
SGD step count and outer state) and rank 0's weights, and loads them on every rank. With
Local SGD every rank's inner optimizer state (Adam moments) is its own, and mid-period so
are its weights; restoring rank 0's on every rank would resume a *different* run. So the
callback also gathers each rank's optimizer state and weights into the checkpoint and, on
resume, gives every rank back its own: the resumed run continues exactly. This costs
``world_size`` copies of weights plus optimizer state in the checkpoint file (pass
``per_rank_state=False`` for rank 0's only, as Lightning does by default). Resumed on a
different number of ranks, every rank starts from their average
(:func:`localsgd_optim.checkpoint.consolidate`).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
import torch.distributed as dist

try:  # the unified package first, then the standalone one
    import lightning.pytorch as pl
except ImportError:
    try:
        import pytorch_lightning as pl
    except ImportError as exc:
        raise ImportError(
            "localsgd_optim.lightning needs PyTorch Lightning: pip install lightning "
            "(or pytorch-lightning)"
        ) from exc

from .checkpoint import consolidate
from .optimizer import LocalSGDOptimizer

__all__ = ["LocalSGDCallback"]


class LocalSGDCallback(pl.Callback):
    """Turns off DDP's gradient all-reduce while the Local SGD optimizer runs its local steps."""

    KEY = "local_sgd_per_rank"

    def __init__(self, per_rank_state: bool = True) -> None:
        self.per_rank_state = bool(per_rank_state)
        self._held: contextlib.ExitStack | None = None
        self._own_weights: dict[str, torch.Tensor] | None = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        _, opt = _find(trainer)
        if self._own_weights is not None:
            # After setup: DDP's constructor broadcast rank 0's weights over the restored ones.
            with torch.no_grad():
                pl_module.load_state_dict(self._own_weights, strict=getattr(pl_module, "strict_loading", True))
            self._own_weights = None
        self._release()
        self._held = contextlib.ExitStack()
        self._held.enter_context(opt.no_sync(trainer.strategy.model))

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        # Lightning builds the checkpoint on every rank and writes rank 0's: gather into rank 0's.
        if not self.per_rank_state or trainer.world_size == 1 or "optimizer_states" not in checkpoint:
            return
        index, _ = _find(trainer)
        mine = {"model": pl_module.state_dict(), "optimizer": checkpoint["optimizer_states"][index]}
        gathered: list[Any] | None = [None] * trainer.world_size if trainer.global_rank == 0 else None
        dist.gather_object(_to_cpu(mine), gathered, dst=0)
        if gathered is not None:
            checkpoint[self.KEY] = {"optimizer_index": index, "ranks": gathered}

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(self.KEY)
        if saved is None or trainer.state.fn != "fit":  # validate/test/predict: rank 0's weights are right
            return
        ranks, rank = saved["ranks"], trainer.global_rank
        if len(ranks) == trainer.world_size:
            own = ranks[rank]
        else:  # a host gone for good (or added): every rank resumes from the saved ranks' average
            if rank == 0:
                warnings.warn(
                    f"LocalSGDCallback: the checkpoint holds the state of {len(ranks)} ranks but this run "
                    f"has {trainer.world_size}; every rank resumes from their average "
                    "(localsgd_optim.checkpoint.consolidate)",
                    UserWarning,
                    stacklevel=2,
                )
            own = consolidate(ranks)
        self._own_weights = own["model"]  # loaded in on_train_start, after DDP's broadcast
        checkpoint["optimizer_states"][saved["optimizer_index"]] = own["optimizer"]  # restored later

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._own_weights = None  # a fit that never started training must not leak them into the next

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._release()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._release()

    def _release(self) -> None:
        if self._held is not None:
            self._held.close()
            self._held = None


def _find(trainer: Any) -> tuple[int, LocalSGDOptimizer]:
    ours = [(i, opt) for i, opt in enumerate(trainer.optimizers) if isinstance(opt, LocalSGDOptimizer)]
    if len(ours) != 1:
        found = [type(opt).__name__ for opt in trainer.optimizers]
        raise ValueError(
            f"LocalSGDCallback needs exactly one LocalSGDOptimizer from configure_optimizers, "
            f"got {found}; return LocalSGDOptimizer(torch.optim.AdamW(...), k=8)"
        )
    if ours[0][1].round_every_s is not None:
        raise ValueError(
            f"LocalSGDCallback with round_every_s={ours[0][1].round_every_s!r} is not supported: Lightning logs, "
            "validates and checkpoints at step counts, which time-budgeted replicas do not share; pass k instead")
    return ours[0]


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {key: _to_cpu(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(value) for value in obj)
    return obj
