"""``LocalSGDOptimizer``: wrap any optimizer, average parameters across ranks every k steps."""

from __future__ import annotations

import math
import numbers
import warnings
import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch.distributed.algorithms.join import Join, JoinHook, Joinable
from torch import nn
from torch.optim import Optimizer

from ._buckets import BucketEngine, bucket_cap_bytes
from ._int8 import Int8Averager
from ._outer import OuterFactory, OuterState
from ._overlap import OverlappedRound
from .ddp import warn_if_buffers_synced
from ._dist import (
    AveragingRoundError,
    LocalSGDError,
    ROUND_BIND,
    ROUND_LOCAL,
    ROUND_SCHEDULED,
    ROUND_SYNC,
    agree_on_round,
    check_ranks_agree,
    describe_tensor,
    fingerprint,
    group_size,
    round_name,
)
from ._schedule import PeriodSpec, Schedule

__all__ = ["LocalSGDOptimizer", "STATE_KEY", "STATE_VERSION"]

#: Key of the Local SGD entry inside the wrapped optimizer's state dict.
STATE_KEY = "local_sgd"
#: Version of that entry's format; bumped on any incompatible change.
STATE_VERSION = 1


class _Comm:
    """Everything needed to talk to the other ranks; ``None`` in a single process."""

    __slots__ = ("group", "world_size", "engine", "control_device", "digest")

    def __init__(self, group: dist.ProcessGroup | None, world_size: int, engine: BucketEngine,
                 control_device: torch.device, digest: int) -> None:
        self.group = group
        self.world_size = world_size
        self.engine = engine
        self.control_device = control_device  # NCCL needs the tiny control tensor on the GPU
        self.digest = digest


class _LocalSGDJoinHook(JoinHook):
    """Shadows the averaging rounds of the ranks still training, once this rank ran out of data."""

    def __init__(self, opt: "LocalSGDOptimizer") -> None:
        self.opt = opt

    def main_hook(self) -> None:
        # The ranks still training took one more step: count it, and join their round if it is one.
        self.opt._after_step(joined=True)

    def post_hook(self, is_last_joiner: bool) -> None:
        # Every rank runs this when the block ends. torch's Join leaves the joinables' config
        # enabled after the block; reset ours, so step() stops notifying (one all-reduce per
        # step) and sync() is allowed again.
        Joinable.__init__(self.opt)


class LocalSGDOptimizer(Optimizer, Joinable):
    r"""Local SGD around any optimizer: local steps, parameters averaged every ``k`` steps.

    Every rank steps its own replica with ``optimizer``; inside the ``k``-th,
    ``2k``-th, ... call of :meth:`step` (after the inner update) the parameters of
    all ranks are replaced by their mean, with one flat, bucketed all-reduce per
    bucket instead of one per parameter. ``k`` counts optimizer steps, never
    micro-batches. The wrapper is a real :class:`torch.optim.Optimizer` sharing the
    inner optimizer's ``param_groups`` and ``state``, so LR schedulers, hooks and
    ``GradScaler`` work unchanged. Without an initialized process group (or with a
    world size of 1) it is a pure pass-through.

    Papers: Stich, "Local SGD Converges Fast and Communicates Little" (ICLR 2019,
    https://arxiv.org/abs/1805.09767); Lin et al., "Don't Use Large Mini-Batches,
    Use Local SGD" (ICLR 2020, https://arxiv.org/abs/1808.07217).

    Args:
        optimizer: the inner optimizer taking the local steps (any ``torch.optim.Optimizer``).
        k: optimizer steps between averaging rounds (default: 8); or a period schedule: a
            list of ``(until_step, period)`` pairs such as ``[(1000, 32), (None, 8)]``, or a
            callable ``step -> period`` (see :class:`localsgd_optim.Schedule`).
        process_group: the ranks to average over (default: ``None``, the default group).
        bucket_cap_mb: largest flat buffer per collective, in MiB (default: 25.0). Extra
            memory during a round is at most two buckets.
        sync_on_init: broadcast parameters from the group's first rank at construction, so
            replicas start identical even without DDP (default: ``True``).
        warmup_steps: post-local SGD: the first ``warmup_steps`` steps are synchronous
            (parameters averaged after each, or DDP's gradient all-reduce left on for a module
            registered with :meth:`no_sync`), Local SGD after (default: 0).
        local_k: hierarchical averaging: also average within ``local_group`` every
            ``local_k`` steps after warmup (e.g. the GPUs of one host, over the fast link);
            a step that is also a global round averages globally only (default: ``None``).
        local_group: this rank's own group for ``local_k`` rounds, e.g. the first value
            returned by ``torch.distributed.new_subgroups()`` (default: ``None``).
        outer_optimizer: DiLoCo / SlowMo: a callable mapping a list of tensors to an
            optimizer (e.g. :func:`localsgd_optim.diloco`). At each scheduled round after
            warmup the averaged pseudo-gradient ``global - local`` steps a global copy of
            the parameters, which is then written into the model. Needs ``sync_on_init``.
            ``sync()`` stays a plain average and leaves the outer state alone (default: ``None``).
        compression: ``"bf16"`` sends the pseudo-gradients of outer rounds as bfloat16: half
            the bytes of fp32 on the wire. ``"int8"``: 1 byte per element with a per-tensor
            scale and error feedback (the quantization residual is carried to the next round;
            +1x parameters of fp32 state), through all-gathers: a gain below 8 ranks. Without ``outer_optimizer`` a plain ``SGD(lr=1.0)``
            outer step is used, i.e. averaging through compressed deltas, which needs a global
            copy of the parameters (default: ``None``: send at full precision).
        overlap_steps: Streaming DiLoCo's overlap: a scheduled round's pseudo-gradients are
            reduced asynchronously while ``overlap_steps`` more local steps run, then applied:
            the outer step, then ``p <- overlap_mix * p + (1 - overlap_mix) * global``.
            Must be smaller than the period; +1x parameters for the in-flight buffers
            (default: 0, blocking rounds).
        overlap_mix: the weight kept of the local parameters when an overlapped round is
            applied (default: 0.5; 0 discards the local progress of those steps).
        buffers: a module whose floating-point buffers (e.g. BatchNorm running statistics)
            are averaged with the parameters, in the same buckets (default: ``None``).
        check_finite: before each round, check every rank's parameters for NaN/Inf (one
            ``sum()`` per parameter, its result riding in the round's control collective) and
            raise on every rank, naming the rank and parameter, instead of averaging the NaN
            into every replica (default: ``True``).

    Example::

        >>> model = torch.nn.Linear(4, 2)
        >>> opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), k=4)
        >>> for _ in range(8):
        ...     model(torch.ones(3, 4)).sum().backward()
        ...     opt.step()
        ...     opt.zero_grad()
        >>> opt.num_steps
        8
    """

    # GradScaler hands us ``grad_scale``/``found_inf`` and always calls step(), so a
    # step skipped for inf/NaN gradients still counts and still joins averaging.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        optimizer: Optimizer,
        k: PeriodSpec = 8,
        *,
        process_group: dist.ProcessGroup | None = None,
        bucket_cap_mb: float = 25.0,
        sync_on_init: bool = True,
        warmup_steps: int = 0,
        local_k: int | None = None,
        local_group: dist.ProcessGroup | None = None,
        buffers: nn.Module | None = None,
        outer_optimizer: OuterFactory | None = None,
        compression: str | None = None,
        overlap_steps: int = 0,
        overlap_mix: float = 0.5,
        check_finite: bool = True,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                "optimizer must be a torch.optim.Optimizer instance, e.g. "
                f"torch.optim.AdamW(model.parameters()), got {type(optimizer).__name__}: {optimizer!r}"
            )
        if isinstance(optimizer, LocalSGDOptimizer):
            raise TypeError("optimizer is already a LocalSGDOptimizer; wrap the inner optimizer once")
        if (
            isinstance(bucket_cap_mb, bool)
            or not isinstance(bucket_cap_mb, numbers.Real)
            or not math.isfinite(bucket_cap_mb)
            or bucket_cap_mb <= 0
        ):
            raise ValueError(f"bucket_cap_mb must be a finite number > 0 (MiB), got {bucket_cap_mb!r}")
        _reject_sharded(optimizer)
        if buffers is not None and not isinstance(buffers, nn.Module):
            raise TypeError(
                f"buffers must be the nn.Module whose buffers to average (e.g. buffers=model), "
                f"got {type(buffers).__name__}"
            )
        schedule = Schedule(k, warmup_steps)
        if outer_optimizer is not None and not callable(outer_optimizer):
            raise TypeError(
                "outer_optimizer must be a callable mapping a list of tensors to an Optimizer, e.g. "
                f"localsgd_optim.diloco(), got {type(outer_optimizer).__name__}"
            )
        wires = {None: None, "bf16": torch.bfloat16, "int8": None}
        if compression not in wires:
            raise ValueError(f"compression must be None, 'bf16' or 'int8', got {compression!r}")
        if compression is not None and any(p.is_complex() for g in optimizer.param_groups for p in g["params"]):
            raise ValueError(f"compression={compression!r} does not support complex parameters yet")
        if compression is not None and buffers is not None:
            raise ValueError(
                f"compression={compression!r} with buffers= is not supported: buffers are absolute "
                "values, not deltas, and would be rounded; average buffers without compression"
            )
        if isinstance(overlap_steps, bool) or not isinstance(overlap_steps, numbers.Integral) or overlap_steps < 0:
            raise ValueError(f"overlap_steps must be an integer >= 0, got {overlap_steps!r}")
        if not isinstance(overlap_mix, numbers.Real) or not 0.0 <= overlap_mix <= 1.0:
            raise ValueError(f"overlap_mix must be a number in [0, 1], got {overlap_mix!r}")
        if overlap_steps and compression is not None:
            raise ValueError("overlap_steps with compression is not supported yet; pass one of them")
        if overlap_steps and local_k is not None:
            raise ValueError("overlap_steps with hierarchical averaging (local_k) is not supported yet")
        if (compression is not None or overlap_steps) and outer_optimizer is None:
            outer_optimizer = _plain_average_outer  # compressed deltas need a global copy
        if outer_optimizer is not None and not sync_on_init:
            raise ValueError(
                "outer_optimizer needs sync_on_init=True: the global copy must start identical on "
                "every rank, got sync_on_init=False"
            )
        if (local_k is None) != (local_group is None):
            raise ValueError(
                "local_k and local_group go together (hierarchical averaging), got "
                f"local_k={local_k!r}, local_group={local_group!r}; pass both or neither"
            )
        if local_k is not None and (isinstance(local_k, bool) or not isinstance(local_k, numbers.Integral)
                                    or local_k < 1):
            raise ValueError(f"local_k must be an integer >= 1, got {local_k!r}")

        self._constructed = False
        super().__init__(optimizer.param_groups, optimizer.defaults)
        Joinable.__init__(self)  # Optimizer.__init__ does not chain to it
        self.optimizer = optimizer
        self._share_inner()
        self._schedule = schedule
        self._next_round = schedule.next_round(0)  # the step of the next scheduled round
        self._ddp_modules: list[nn.Module] = []  # registered by no_sync(): DDP syncs during warmup
        self.buffers_module = buffers
        self.local_k = int(local_k) if local_k is not None else 0
        self.local_group = local_group
        self.process_group = process_group
        self.bucket_cap_mb = float(bucket_cap_mb)
        self.check_finite = bool(check_finite)
        self.compression = compression
        self._wire_dtype = wires[compression]
        self._num_steps = 0
        self._start_steps = 0  # the count this run started or resumed from: ranks must agree
        self._comm: _Comm | None = None
        self._single = False  # bound to a world of one: never communicate
        self._pending_broadcast = sync_on_init
        self._constructed = True
        # Built before binding, so the bind check compares them across ranks; the global copy
        # is re-taken right after the binding broadcast, so it starts identical everywhere.
        self._outer = OuterState(self._params(), outer_optimizer) if outer_optimizer is not None else None
        self._int8 = (Int8Averager(self._params(), bucket_cap_bytes(self.bucket_cap_mb))
                      if compression == "int8" else None)
        self.overlap_steps, self.overlap_mix = int(overlap_steps), float(overlap_mix)
        self._overlap = (OverlappedRound(self._params(), bucket_cap_bytes(self.bucket_cap_mb))
                         if overlap_steps else None)
        self._bind()

    # -- sharing with the inner optimizer ---------------------------------------------------

    def _share_inner(self) -> None:
        # Same objects, not copies: an LR set on the wrapper is the LR the inner step uses.
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        self.defaults = self.optimizer.defaults

    @property
    def k(self) -> PeriodSpec:
        """The period: an int, or the schedule it was given as."""
        return self._schedule.spec

    @property
    def warmup_steps(self) -> int:
        return self._schedule.warmup_steps

    @property
    def num_steps(self) -> int:
        """Calls of :meth:`step` so far (restored by :meth:`load_state_dict`)."""
        return self._num_steps

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _buffers(self) -> list[tuple[str, torch.Tensor]]:
        # Collected afresh each round: module.to() rebinds buffer objects. Integer buffers
        # (BatchNorm's num_batches_tracked) count steps identically on every rank: left alone.
        if self.buffers_module is None:
            return []
        return [(n, b) for n, b in self.buffers_module.named_buffers()
                if b.is_floating_point() or b.is_complex()]

    def _tensors(self) -> list[torch.Tensor]:
        """Everything a round averages, in a rank-independent order: parameters, then buffers."""
        return self._params() + [b for _, b in self._buffers()]

    def _param_names(self) -> list[str]:
        names = []
        for g, group in enumerate(self.param_groups):
            given = group.get("param_names")
            for i in range(len(group["params"])):
                where = f"param group {g}, index {i}"
                names.append(f"parameter {given[i]!r} ({where})" if given else f"parameter ({where})")
        return names + [f"buffer {n!r}" for n, _ in self._buffers()]

    # -- the process group --------------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        outer = self._outer
        return {"k": self._schedule.description, "warmup_steps": self.warmup_steps,
                "local_k": self.local_k, "bucket_cap_mb": self.bucket_cap_mb,
                "compression": self.compression,
                "outer_optimizer": None if outer is None else
                f"{type(outer.optimizer).__name__}{sorted(outer.optimizer.defaults.items())}",
                "overlap": [self.overlap_steps, self.overlap_mix]}

    def _digest(self) -> int:
        return fingerprint(self._settings(), [describe_tensor(t) for t in self._tensors()])

    def _explain_layout(self) -> None:
        check_ranks_agree(self.process_group, self._settings(),
                          [describe_tensor(t) for t in self._tensors()], self._param_names())

    def _make_comm(self, world_size: int) -> _Comm:
        """Plan the buckets for the current param groups (local work, no collective)."""
        params = self._tensors()
        for name, p in zip(self._param_names(), params):
            if not (p.is_floating_point() or p.is_complex()):
                raise TypeError(
                    f"{name} has dtype {p.dtype}: only floating-point and complex parameters can be "
                    "averaged; remove it from the optimizer or register it as a buffer"
                )
        engine = BucketEngine(params, bucket_cap_bytes(self.bucket_cap_mb))
        nccl = dist.get_backend(self.process_group) == "nccl"
        device = params[0].device if nccl and params else torch.device("cpu")
        return _Comm(self.process_group, world_size, engine, device, self._digest())

    def _bind(self) -> _Comm | None:
        """Bind to the process group once it exists; ``None`` means a single process (for now).

        Binding is a collective: every rank checks that all wrap the same parameters and
        settings, then (``sync_on_init``) parameters are broadcast from the group's first
        rank. A group initialized after construction is bound at the next ``step()``.
        """
        if self._comm is not None or self._single:
            return self._comm
        world_size = group_size(self.process_group)
        if world_size == 1:
            self._single = dist.is_available() and dist.is_initialized()
            return None
        comm = self._make_comm(world_size)
        self._comm = comm
        try:
            self._agree(ROUND_BIND)
        except BaseException:
            self._comm = None  # not bound: the next step() or sync() tries again
            raise
        if self._pending_broadcast:
            comm.engine.broadcast(dist.get_global_rank(comm.group or dist.group.WORLD, 0), comm.group)
            self._pending_broadcast = False
            if self._outer is not None:  # bound late: re-take the global copy
                self._outer.reset(self._params())
        return comm

    def _agree(self, kind: int, joined: bool = False, group: Any = None,
               wire_dtype: torch.dtype | None = None, outer_round: bool = False) -> int:
        """Run the round's control collective over ``group``; return how many ranks contribute data."""
        comm = self._comm
        assert comm is not None  # internal invariant, not user input
        # Everything that can fail locally happens before the gather, and a failure is
        # announced in it: no rank is ever left waiting in a data collective.
        nonfinite, local_error = -1, None
        try:
            if comm.engine.refresh(self._tensors()):  # storage moved or buffers rebound: re-digest
                comm.digest = self._digest()
            if outer_round:
                self._check_outer_compatible()
            if outer_round and self._int8 is not None:
                self._int8.prepare(dist.get_world_size(comm.group if group is None else group))
            else:
                comm.engine.prepare(wire_dtype)
            if self.check_finite and kind != ROUND_BIND and not joined:
                nonfinite = self._first_nonfinite(comm.engine.tensors)
        except Exception as e:  # noqa: BLE001 - re-raised on this rank right after the gather
            local_error = e
        group = comm.group if group is None else group
        return agree_on_round(group, comm.control_device, kind, self._num_steps, self._start_steps,
                              comm.digest, self._explain_layout, nonfinite, self._param_names, joined,
                              local_error)

    def _check_outer_compatible(self) -> None:
        """The global copy must still match the parameters (a model moved after construction does not)."""
        assert self._outer is not None
        for name, g, p in zip(self._param_names(), self._outer.globals, self._params()):
            if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
                raise ValueError(
                    f"{name} is now {p.dtype}{list(p.shape)} on {p.device} but the outer optimizer's global "
                    f"copy is {g.dtype}{list(g.shape)} on {g.device}: move or cast the model before "
                    "constructing LocalSGDOptimizer with an outer_optimizer or compression"
                )

    @staticmethod
    @torch.no_grad()
    def _first_nonfinite(params: list[torch.Tensor]) -> int:
        """Index of this rank's first parameter holding NaN/Inf, or -1.

        A sum propagates NaN and +-Inf (a max would miss -Inf): one reduction per parameter,
        one ``isfinite`` and host sync per (device, dtype).
        """
        first = -1
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, p in enumerate(params):
            groups.setdefault((p.device, p.dtype), []).append(i)
        for (_, dtype), indices in groups.items():
            # accumulate narrow types wide: an fp16 sum overflows at 65504 on healthy values
            acc = {torch.float16: torch.float32, torch.bfloat16: torch.float32,
                   torch.complex32: torch.complex64}.get(dtype)
            finite = torch.stack([params[i].sum(dtype=acc) for i in indices]).isfinite()
            bad = (~finite).nonzero()
            if bad.numel():
                i = indices[int(bad[0])]
                first = i if first < 0 else min(first, i)
        return first

    @contextlib.contextmanager
    def _collective_errors(self, what: str) -> Iterator[None]:
        """Re-raise a communication failure as AveragingRoundError saying which round; pass the rest."""
        try:
            yield
        except (LocalSGDError, torch.OutOfMemoryError, NotImplementedError):
            raise
        except RuntimeError as e:  # gloo/NCCL errors: a dead peer, a broken link, a timeout
            comm = self._comm
            where = f" on rank {dist.get_rank(comm.group)} of {comm.world_size}" if comm is not None else ""
            raise AveragingRoundError(
                f"LocalSGDOptimizer: {what} failed{where}: {type(e).__name__}: {e}. If a rank died, "
                "restart the job from the last checkpoint (see 'Failure modes' in the README)."
            ) from e

    def _round(self, kind: int, joined: bool = False) -> None:
        comm = self._bind()
        outer = self._outer if kind == ROUND_SCHEDULED and self._num_steps > self.warmup_steps else None
        if comm is None:
            if outer is not None:  # one worker: the mean pseudo-gradient is its own
                params = self._params()
                outer.to_deltas(params)
                outer.apply(params)
            return
        local = kind == ROUND_LOCAL
        group = self.local_group if local else comm.group
        size = dist.get_world_size(group) if local else comm.world_size
        wire = self._wire_dtype if outer is not None else None  # only deltas are compressed
        with self._collective_errors(f"{round_name(kind)} at step {self._num_steps}"):
            contributors = self._agree(kind, joined, group, wire, outer_round=outer is not None)
            if outer is not None:
                outer.to_deltas(self._params())
            try:
                if not contributors:  # every rank of this group has joined: all of them skip
                    pass
                elif outer is not None and self._int8 is not None:
                    self._int8.average(self._params(), group, contributors, send_zeros=joined)
                else:
                    comm.engine.all_reduce_mean(group, size, contributors, send_zeros=joined, wire_dtype=wire)
                if outer is not None:
                    outer.apply(self._params())
            except BaseException:
                if outer is not None:  # never leave pseudo-gradients in the model: the global
                    outer.reset_params(self._params())  # copy is the same on every rank
                raise

    # -- stepping ---------------------------------------------------------------------------

    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        """Take one inner step; inside every ``k``-th call, then average parameters.

        Args:
            closure: re-evaluates the model and returns the loss (passed to the inner step).

        Returns:
            Whatever the inner optimizer's ``step`` returns (the closure's loss).
        """
        if self._comm is None and not self._single:
            self._bind()  # a process group created after construction: bind before stepping
        if self._join_config.enable:
            if not self._join_config.is_first_joinable:
                # Join runs the joined ranks' hooks once per notify of the FIRST joinable: a DDP
                # module first would make them count forward passes, not optimizer steps.
                raise LocalSGDError(
                    "LocalSGDOptimizer must be the first (or only) joinable: use Join([opt]). DDP "
                    "needs no Join of its own here: under no_sync it issues no collectives."
                )
            Join.notify_join_context(self)  # under Join: tell the joined ranks we took a step
        try:
            loss = self._inner_step(closure)
            self._after_step()
        except BaseException:
            # GradScaler deletes its grad_scale/found_inf only after a normal return: drop
            # them here so a later plain step() does not read a stale verdict.
            self.__dict__.pop("grad_scale", None)
            self.__dict__.pop("found_inf", None)
            raise
        return loss

    def _after_step(self, joined: bool = False) -> None:
        """Count a step and run its round, if the schedule has one (a few int compares if not)."""
        self._num_steps += 1
        step = self._num_steps
        if step <= self._schedule.warmup_steps:
            if not self._ddp_modules:  # DDP all-reduced the gradients: replicas are equal
                self._round(ROUND_SCHEDULED, joined)
            if step == self._schedule.warmup_steps:
                self._set_ddp_grad_sync(False)  # warmup over: local steps from here
                if self._outer is not None:
                    self._outer.reset(self._params())  # the outer loop starts from here
        elif step == self._next_round:  # a global round takes precedence over a local one
            if self._overlap is not None:
                self._launch_overlapped(joined)
            else:
                self._round(ROUND_SCHEDULED, joined)
            self._next_round = self._schedule.next_round(step)
        elif self.local_k and (step - self._schedule.warmup_steps) % self.local_k == 0:
            self._round(ROUND_LOCAL, joined)
        if self._overlap is not None and step == self._overlap.apply_at:
            self._apply_overlapped()  # the overlapped round launched overlap_steps ago lands now

    def _launch_overlapped(self, joined: bool) -> None:
        """Control round now; pseudo-gradients reduced in the background until step + tau."""
        step = self._num_steps
        apply_at = step + self.overlap_steps
        if apply_at >= self._schedule.next_round(step):
            raise ValueError(
                f"overlap_steps={self.overlap_steps} must be smaller than the period: the round "
                f"launched at step {step} would still be in flight at the next one"
            )
        assert self._outer is not None and self._overlap is not None  # set together in __init__
        comm = self._bind()
        if comm is None:  # one worker: nothing to overlap; apply the round at once
            self._round(ROUND_SCHEDULED, joined)
            return
        with self._collective_errors(f"the overlapped round launched at step {step}"):
            contributors = self._agree(ROUND_SCHEDULED, joined)
            self._overlap.launch(self._outer.globals, self._params(), comm.group, contributors, joined, apply_at)

    def _apply_overlapped(self) -> None:
        assert self._outer is not None and self._overlap is not None
        with self._collective_errors(f"the overlapped round applied at step {self._num_steps}"):
            self._overlap.finish()
        self._outer.step(self._overlap.views)
        with torch.no_grad():  # p <- mix * p + (1 - mix) * global: keep part of the local progress
            torch._foreach_lerp_(self._params(), self._outer.globals, 1.0 - self.overlap_mix)
        self._overlap.apply_at = None

    def _set_ddp_grad_sync(self, on: bool) -> None:
        for module in self._ddp_modules:
            module.require_backward_grad_sync = on

    @contextlib.contextmanager
    def no_sync(self, module: nn.Module) -> Iterator[None]:
        """Like :func:`localsgd_optim.no_sync`, but driven by this optimizer's schedule.

        For a DDP module, gradient all-reduce stays on during ``warmup_steps`` (no parameter
        averaging needed then) and turns off when warmup ends, so post-local SGD is
        configured once, by ``warmup_steps``. For any other module it does nothing.
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}: {module!r}")
        if not hasattr(module, "require_backward_grad_sync"):  # not DDP
            yield
            return
        warn_if_buffers_synced(module)
        previous = module.require_backward_grad_sync
        self._ddp_modules.append(module)
        module.require_backward_grad_sync = self._num_steps < self._schedule.warmup_steps
        try:
            yield
        finally:
            self._ddp_modules.remove(module)
            module.require_backward_grad_sync = previous

    def _inner_step(self, closure: Callable[[], float] | None) -> Any:
        found_inf = getattr(self, "found_inf", None)
        if found_inf is None:  # the common path: no GradScaler
            return self.optimizer.step(closure)
        grad_scale = getattr(self, "grad_scale", None)
        inner = self.optimizer
        if getattr(inner, "_step_supports_amp_scaling", False):
            inner.grad_scale, inner.found_inf = grad_scale, found_inf  # type: ignore[attr-defined]
            try:
                return inner.step(closure)
            finally:
                del inner.grad_scale, inner.found_inf  # type: ignore[attr-defined]
        if found_inf.item() != 0:
            return None  # GradScaler's verdict: skip the update (the step still counts)
        if grad_scale is not None:
            self._unscale_grads(grad_scale)
        return inner.step(closure)

    @torch.no_grad()
    def _unscale_grads(self, grad_scale: torch.Tensor) -> None:
        # Same arithmetic as GradScaler.unscale_: multiply by the fp32 reciprocal.
        inv_scale = grad_scale.double().reciprocal().float()
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for p in self._params():
            if p.grad is not None:
                grad = p.grad._values() if p.grad.is_sparse else p.grad
                by_device.setdefault(grad.device, []).append(grad)
        for device, grads in by_device.items():
            torch._foreach_mul_(grads, inv_scale.to(device))

    def sync(self) -> None:
        """Average parameters across ranks now (a collective: call it on every rank).

        Does not shift the schedule. A no-op in a single process. Raises
        :class:`ScheduleMismatchError` on every rank if the ranks' step counts differ.
        Not allowed inside an active ``Join`` block (ranks that joined only shadow
        ``step()``): call it after the block.
        """
        if self._join_config.enable:
            raise LocalSGDError(
                "LocalSGDOptimizer.sync() inside an active Join block would hang: ranks that have "
                "joined shadow step() only. Call opt.sync() after the `with Join(...)` block."
            )
        self._round(ROUND_SYNC)

    # -- torch.distributed.algorithms.Join --------------------------------------------------

    def join_hook(self, **kwargs: Any) -> JoinHook:
        """The hook :class:`~torch.distributed.algorithms.Join` runs on a rank that ran out of data.

        Such a rank keeps counting the others' steps and joins their averaging rounds,
        contributing nothing: the average is over the ranks still training, and the
        joined rank receives it. The optimizer must be the first joinable: ``Join([opt])``
        (a DDP module under :func:`no_sync` needs no Join of its own).
        """
        return _LocalSGDJoinHook(self)

    @property
    def join_device(self) -> torch.device:
        comm = self._bind()
        return comm.control_device if comm is not None else torch.device("cpu")

    @property
    def join_process_group(self) -> Any:
        return self.process_group if self.process_group is not None else dist.group.WORLD

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset gradients through the inner optimizer (see :meth:`torch.optim.Optimizer.zero_grad`)."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to the inner optimizer; its parameters are averaged from the next round.

        Call it identically on every rank: the next round's control collective compares
        every rank's layout and raises on all of them if one rank added a different group.
        """
        if not self._constructed:  # Optimizer.__init__ registering the inner groups
            super().add_param_group(param_group)
            return
        if self._outer is not None:
            raise ValueError(
                "add_param_group is not supported with an outer_optimizer, compression or "
                "overlap_steps (their global copy and state are per parameter); add every "
                "parameter group before constructing LocalSGDOptimizer"
            )
        self.optimizer.add_param_group(param_group)
        if self._comm is not None:
            self._comm = self._make_comm(self._comm.world_size)

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus a versioned ``"local_sgd"`` entry.

        The entry holds only plain Python values, so ``torch.load(..., weights_only=True)``
        reads the whole checkpoint.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = self.optimizer.state_dict()
        state_dict[STATE_KEY] = {"version": STATE_VERSION, "num_steps": self._num_steps,
                                 "k": self._schedule.description, "warmup_steps": self.warmup_steps}
        if self._outer is not None:
            state_dict[STATE_KEY]["outer"] = self._outer.state_dict()
        if self._int8 is not None:
            state_dict[STATE_KEY]["int8_residuals"] = self._int8.state_dict()
        if self._overlap is not None and self._overlap.apply_at is not None:
            state_dict[STATE_KEY]["in_flight"] = self._overlap.state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` (or a plain optimizer's, with a warning).

        Restores the inner optimizer and the step count, so the schedule resumes at the
        exact phase it was saved in.
        """
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        entry = state_dict.pop(STATE_KEY, None)
        self._load_around(entry, lambda: self.optimizer.load_state_dict(state_dict))
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _load_around(self, entry: Any, load_inner: Callable[[], None]) -> None:
        """Validate the Local SGD ``entry``, run ``load_inner`` (the inner optimizer's load), apply it."""
        num_steps, saved_k = _parse_entry(entry)  # validate before anything changes
        outer_state = entry.get("outer") if isinstance(entry, dict) else None
        residuals = entry.get("int8_residuals") if isinstance(entry, dict) else None
        if self._int8 is not None and residuals is not None:
            self._int8.check(residuals)  # validate before anything changes
        mine = self._schedule.description
        if saved_k is not None and saved_k != mine:
            warnings.warn(
                f"The checkpoint was saved with k={saved_k}; this optimizer has k={mine}. "
                f"Continuing from step {num_steps} with k={mine}.",
                UserWarning,
                stacklevel=3,
            )
        load_inner()
        self._share_inner()  # load_state_dict rebinds the inner param_groups and state
        if self._outer is not None:
            if outer_state is None:
                warnings.warn(
                    "The checkpoint has no outer-optimizer state (saved without outer_optimizer, "
                    "compression or overlap): starting the outer loop from the current parameters.",
                    UserWarning,
                    stacklevel=3,
                )
                self._outer.reset(self._params())
            else:
                self._outer.load_state_dict(outer_state)
        if self._int8 is not None:
            self._int8.load_state_dict(residuals)  # None: error feedback starts from zero
        if self._overlap is not None:
            in_flight = entry.get("in_flight") if isinstance(entry, dict) else None
            self._overlap.load_state_dict(in_flight or {})
        self._num_steps = self._start_steps = num_steps
        # The next round is derived, not stored: replay the schedule up to the loaded step.
        self._next_round = self._schedule.next_round(0)
        while self._next_round <= num_steps:
            self._next_round = self._schedule.next_round(self._next_round)
        self._set_ddp_grad_sync(num_steps < self.warmup_steps)

    def __getstate__(self) -> dict[str, Any]:
        if self.process_group is not None or self.local_group is not None:
            raise TypeError(
                "cannot pickle or deepcopy a LocalSGDOptimizer with an explicit process_group (process "
                "groups do not pickle); build a new LocalSGDOptimizer around the copied inner optimizer"
            )
        state = self.__dict__.copy()
        state["_comm"], state["_single"] = None, False  # rebinds to the default group on next use
        return state

    def __repr__(self) -> str:
        inner = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        return (
            f"{type(self).__name__}(k={self._schedule.description}, warmup_steps={self.warmup_steps}, "
            f"num_steps={self._num_steps}, "
            f"bucket_cap_mb={self.bucket_cap_mb},\n{inner}\n)"
        )


def _reject_sharded(optimizer: Optimizer) -> None:
    """FSDP / DTensor parameters hold shards: averaging them as whole tensors would be wrong."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        DTensor = ()  # type: ignore[assignment,misc]
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            if isinstance(p, DTensor) or type(p).__name__ == "FlatParameter":
                raise TypeError(
                    f"parameter (param group {g}, index {i}) is a {type(p).__name__}: FSDP, DTensor and "
                    "tensor-parallel parameters are sharded, which LocalSGDOptimizer does not support; "
                    "use it with DDP or plain modules"
                )


def _plain_average_outer(params: list[torch.Tensor]) -> Optimizer:
    """global - mean(global - local) = mean(local): averaging, through (compressible) deltas."""
    return torch.optim.SGD(params, lr=1.0)


def _parse_entry(entry: Any) -> tuple[int, int | None]:
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
