"""🤗 Transformers ``Trainer``: Local SGD under the Trainer's own DDP, with exact resumes.

Use :class:`LocalSGDTrainer` in place of ``Trainer``, or mix :class:`LocalSGDTrainerMixin` into
any ``Trainer`` subclass (TRL's ``SFTTrainer``, your own)::

    from localsgd_optim.transformers import LocalSGDTrainer

    trainer = LocalSGDTrainer(model=model, args=training_args, train_dataset=ds, local_sgd={"k": 8})
    trainer.train()

    class MySFTTrainer(LocalSGDTrainerMixin, SFTTrainer): ...

What it changes, and why each is needed:

- **The optimizer.** The Trainer builds its optimizer as usual (from ``TrainingArguments``, or
  the one passed in ``optimizers=``) and the mixin wraps it: ``LocalSGDOptimizer(optimizer,
  **local_sgd)``. Pass a ``LocalSGDOptimizer`` in ``optimizers=`` instead to build it yourself.
  ``k`` counts optimizer steps, so with ``gradient_accumulation_steps=G`` a round comes every
  ``k * G`` micro-batches.
- **DDP's gradient all-reduce.** The Trainer wraps the model in DDP after building the
  optimizer, and DDP would all-reduce gradients in every backward. A callback holds
  :meth:`LocalSGDOptimizer.no_sync` on the wrapped model from the start of the training loop
  to its end: no gradient all-reduce on local steps, DDP's own (once per optimizer step, on
  the last micro-batch) during ``warmup_steps``. ``ddp_broadcast_buffers`` defaults to ``False`` (a broadcast from
  rank 0 in every forward would be a per-step collective); average buffers with
  ``local_sgd={"buffers": model, ...}`` if they change in training.
- **Checkpoints.** The Trainer writes rank 0's weights and optimizer state. Mid-period every
  rank's weights and Adam moments are its own, so each rank also writes
  ``localsgd_rank<r>.pt`` (its weights and full optimizer state) into the checkpoint folder, and
  ``resume_from_checkpoint`` gives every rank back its own: the resumed run continues exactly.
  Resumed on a different number of ranks, every rank loads their
  :func:`~localsgd_optim.checkpoint.consolidate` d average instead.
- **The end of training.** ``train()`` ends with :meth:`LocalSGDOptimizer.sync`, so the model
  you save or evaluate afterwards is the average, the same on every rank. The weights inside
  a mid-training checkpoint folder are rank 0's, as they are with Lightning.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any, Mapping

import torch
import torch.distributed as dist

try:
    import transformers
    import transformers.trainer
except ImportError as exc:
    raise ImportError("localsgd_optim.transformers needs 🤗 Transformers: pip install transformers") from exc

from . import checkpoint
from .optimizer import LocalSGDOptimizer

#: The Trainer's scheduler file in a checkpoint folder.
SCHEDULER_NAME = getattr(transformers.trainer, "SCHEDULER_NAME", "scheduler.pt")

__all__ = ["LocalSGDTrainerMixin", "LocalSGDTrainer", "RANK_FILE"]

#: Each rank's own state inside a checkpoint folder (formatted with the rank).
RANK_FILE = "localsgd_rank{}.pt"


class LocalSGDTrainerMixin:
    """Local SGD for a ``transformers.Trainer`` subclass; put it first among the bases.

    Args:
        local_sgd: keyword arguments of :class:`~localsgd_optim.LocalSGDOptimizer` (``k`` at
            least), which wraps the optimizer the Trainer builds. Leave it out when
            ``optimizers=`` already holds a ``LocalSGDOptimizer``.
        *args, **kwargs: the Trainer's own.
    """

    def __init__(self, *args: Any, local_sgd: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        if local_sgd is not None and not isinstance(local_sgd, Mapping):
            raise TypeError(
                f"local_sgd must be a dict of LocalSGDOptimizer arguments, got {type(local_sgd).__name__}: "
                f"{local_sgd!r}; pass for example local_sgd={{'k': 8}}"
            )
        self.local_sgd_options = dict(local_sgd) if local_sgd is not None else None
        super().__init__(*args, **kwargs)
        self.add_callback(_NoSyncCallback(self))
        if getattr(self.args, "ddp_broadcast_buffers", False) is None:
            self.args.ddp_broadcast_buffers = False
        supplied = self.optimizer  # from optimizers=(...), or None
        if isinstance(supplied, LocalSGDOptimizer) and self.local_sgd_options is not None:
            raise ValueError(
                "local_sgd= was given but optimizers= already holds a LocalSGDOptimizer; pass one or the "
                "other (local_sgd wraps the optimizer the Trainer builds)"
            )
        timed = (self.local_sgd_options or {}).get("round_every_s", getattr(supplied, "round_every_s", None))
        if timed is not None:
            raise ValueError(
                f"LocalSGDTrainer with round_every_s={timed!r} is not supported: the Trainer logs, evaluates and "
                "saves at step counts, which time-budgeted replicas do not share; pass k instead")
        if not isinstance(supplied, LocalSGDOptimizer) and self.local_sgd_options is None:
            raise TypeError(
                "LocalSGDTrainer needs local_sgd=, the LocalSGDOptimizer arguments (for example "
                "local_sgd={'k': 8}), or a LocalSGDOptimizer in optimizers=(optimizer, scheduler)"
            )

    # -- the optimizer ---------------------------------------------------------------------

    def create_optimizer(self) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer()
        if not isinstance(optimizer, LocalSGDOptimizer):
            optimizer = self.optimizer = LocalSGDOptimizer(optimizer, **self.local_sgd_options)
        return optimizer

    @property
    def local_sgd_optimizer(self) -> LocalSGDOptimizer:
        """The :class:`~localsgd_optim.LocalSGDOptimizer` (inside Accelerate's wrapper once training started)."""
        optimizer = self.optimizer
        while optimizer is not None and not isinstance(optimizer, LocalSGDOptimizer):
            optimizer = getattr(optimizer, "optimizer", None)  # AcceleratedOptimizer
        if optimizer is None:
            raise RuntimeError("the LocalSGDOptimizer is built when training starts: call trainer.train() first")
        return optimizer

    # -- local steps -----------------------------------------------------------------------

    def _hold_no_sync(self) -> None:
        """From the start of the training loop (the model is DDP-wrapped by now) to its end."""
        self._release_no_sync()
        self._no_sync = contextlib.ExitStack()
        self._no_sync.enter_context(self.local_sgd_optimizer.no_sync(self.model_wrapped))

    def _release_no_sync(self) -> None:
        held, self._no_sync = getattr(self, "_no_sync", None), None
        if held is not None:
            held.close()

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's ``train()``, then one :meth:`LocalSGDOptimizer.sync`: the model ends averaged."""
        try:
            output = super().train(*args, **kwargs)
        finally:
            self._release_no_sync()
        self.local_sgd_optimizer.sync()
        return output

    # -- checkpoints -----------------------------------------------------------------------

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        rank, world = _rank_and_world()
        os.makedirs(output_dir, exist_ok=True)
        own = {"model": self.model.state_dict(), "optimizer": self.local_sgd_optimizer.state_dict(),
               "world_size": world}
        path = os.path.join(output_dir, RANK_FILE.format(rank))
        torch.save(own, path + ".tmp")
        os.replace(path + ".tmp", path)  # atomic: a crash mid-write never leaves a torn file

    def _load_optimizer_and_scheduler(self, checkpoint_dir: str | None) -> None:
        rank, world = _rank_and_world()
        first = os.path.join(checkpoint_dir or "", RANK_FILE.format(0))
        if checkpoint_dir is None or not os.path.isfile(first):
            if checkpoint_dir is not None and rank == 0:
                warnings.warn(
                    f"{checkpoint_dir} has no {RANK_FILE.format(0)} (it was not saved by a LocalSGDTrainer): "
                    "every rank resumes from rank 0's weights and optimizer state",
                    UserWarning,
                    stacklevel=2,
                )
            super()._load_optimizer_and_scheduler(checkpoint_dir)
            return
        # Our files hold each rank's whole optimizer state: the Trainer's optimizer.pt (rank 0's)
        # is not read. (Its loader also maps to args.device, "cpu:<rank>" on CPU, which torch 2.13's
        # torch.load refuses.)
        own, _ = checkpoint.load_per_rank(lambda r: os.path.join(checkpoint_dir, RANK_FILE.format(r)), rank, world)
        # After DDP's construction broadcast rank 0's weights: in place, into the wrapped module.
        with torch.no_grad():
            self.model.load_state_dict(own["model"])
        self.local_sgd_optimizer.load_state_dict(own["optimizer"])
        scheduler = os.path.join(checkpoint_dir, SCHEDULER_NAME)
        if os.path.isfile(scheduler):
            self.lr_scheduler.load_state_dict(torch.load(scheduler, weights_only=True))


class _NoSyncCallback(transformers.TrainerCallback):
    """Holds the optimizer's ``no_sync`` on the DDP model for the whole training loop.

    The whole loop, not each ``training_step``: the optimizer then turns DDP's gradient sync
    off itself when warmup ends, the Trainer's own ``no_sync`` for accumulation micro-batches
    nests inside, and ``step()`` sees the DDP module registered (so warmup steps, whose
    gradients DDP already averaged, run no parameter round).
    """

    def __init__(self, trainer: LocalSGDTrainerMixin) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._hold_no_sync()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._release_no_sync()


class LocalSGDTrainer(LocalSGDTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` with Local SGD: see :class:`LocalSGDTrainerMixin`."""


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
