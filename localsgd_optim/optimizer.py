"""``LocalSGDOptimizer``: wrap any optimizer, average parameters across ranks every k steps.

The wrapper is a façade: it counts steps, asks the schedule's :class:`~localsgd_optim._schedule.Cursor`
which events a step has, and hands each to a round strategy from :mod:`localsgd_optim.rounds`,
driving every round the same way (prepare locally, agree in one control collective, run).
"""

from __future__ import annotations

import contextlib
import functools
import time
import warnings
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.join import Join, JoinHook, Joinable
from torch.optim import Optimizer

from ._amp import inner_step
from ._binding import Binding, Members
from ._buckets import BucketEngine, bucket_cap_bytes
from ._config import Config
from ._dist import LocalSGDError, RoundKind, group_size, is_nccl, on_any_rank
from ._outer import OuterFactory
from ._schedule import Event, PeriodSpec
from ._sharded import find_sharding
from ._state import STATE_KEY, STATE_VERSION, parse_entry
from .compression import Compression
from .ddp import scheduled_no_sync
from .rounds import Round, RoundContext, build_rounds

__all__ = ["LocalSGDOptimizer", "STATE_KEY", "STATE_VERSION"]


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


def _setting(name: str, doc: str) -> property:
    return property(lambda self: getattr(self._config, name), doc=doc)


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
        k: optimizer steps between averaging rounds (default: ``None``, meaning 8); or a period
            schedule: a list of ``(until_step, period)`` pairs such as ``[(1000, 32), (None, 8)]``,
            or a callable ``step -> period`` (see :class:`localsgd_optim.Schedule`). Not with
            ``round_every_s``.
        process_group: the ranks to average over (default: ``None``, the default group). For
            sharded replicas (FSDP2, tensor parallel, FSDP1) the ranks that hold the same shard
            in different replicas: ``mesh.get_group("replicate")``, or the 1-D mesh
            ``mesh["replicate"]`` itself; each parameter's local shard is averaged over them
            (see ``docs/integrations.md``).
        bucket_cap_mb: largest flat buffer per collective, in MiB (default: 25.0). Extra
            memory during a round is at most two buckets.
        sync_on_init: broadcast parameters from the group's first rank at construction, so
            replicas start identical even without DDP; frozen ones (``requires_grad=False``,
            never averaged) too, this once (default: ``True``).
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
            +1x parameters of fp32 state), through all-gathers: a gain below 8 ranks.
            :func:`localsgd_optim.topk` / :func:`localsgd_optim.quantize` (or ``"int4"``,
            ``"int2"``): per chunk of each tensor, the largest ``fraction`` and/or ``bits``-bit
            codes with a per-chunk step, error feedback as int8, one all-gather per bucket
            (e.g. ``topk(0.01, bits=2)``: 0.6% of an fp32 round's bytes). Without
            ``outer_optimizer`` a plain ``SGD(lr=1.0)`` outer step is used, i.e. averaging
            through compressed deltas, which needs a global copy of the parameters (default:
            ``None``: send at full precision).
        overlap_steps: Streaming DiLoCo's overlap: a scheduled round's pseudo-gradients are
            reduced asynchronously while ``overlap_steps`` more local steps run, then applied:
            the outer step, then ``p <- overlap_mix * p + (1 - overlap_mix) * global``.
            Must be smaller than the period; +1x parameters for the in-flight buffers
            (default: 0, blocking rounds). With ``round_every_s``: asynchronous rounds (see there).
        overlap_mix: the weight kept of the local parameters when an overlapped round is
            applied (default: ``None``, meaning 0.5; 0 discards the local progress of those
            steps). Only with ``overlap_steps``: given without it, a ``ValueError``.
        buffers: a module whose floating-point buffers (e.g. BatchNorm running statistics)
            are averaged with the parameters, in the same buckets; overlapped rounds average them
            at the launch, blocking (default: ``None``).
        check_finite: before each round, check every rank's parameters, averaged buffers and
            averaged optimizer state for NaN/Inf (one ``sum()`` per flat buffer, its verdict riding
            in the round's control collective) and raise on every rank, naming the rank and tensor,
            instead of averaging the NaN into every replica (default: ``True``).
        flat_params: when the optimizer binds to the process group, move every parameter once
            into persistent flat storage (one contiguous buffer per (device, dtype); ``p.data``
            becomes a view of it with the same strides), so a round reduces each bucket where it
            lives: no packing, O(buckets) work. Parameters are never moved again unless the model
            is moved or cast (``model.to()``), which is detected and re-flattened. ``False``: the
            copy engine, parameters keep their own storage and each round packs them into two
            reusable buffers (default: ``True``).
        average_optimizer_state: also average the inner optimizer's per-parameter state (Adam's
            moments, SGD's momentum buffer; not ``step``) at warmup, scheduled and local rounds, in
            buckets of its own: replicas then restart each period from the same optimizer state,
            as in Local Adam variants. Costs the state's bytes per round on top of the parameters'
            (AdamW: 3x). Not with ``compression`` or ``overlap_steps``; ``sync()`` averages the
            parameters only (default: ``False``).
        fragments: Streaming DiLoCo: split the parameters into this many contiguous fragments
            (parameter order, balanced by bytes; ``buffers`` go with the last) and sync one at a
            time, fragment ``i`` (0-based) at the steps ``s`` after warmup with
            ``(s - warmup_steps) % k == (k * (i + 1) // fragments) % k``: the last at multiples
            of ``k``, the others staggered before it. Each round moves ``1/fragments`` of the
            bytes. Every option of the scheduled round applies per fragment: ``outer_optimizer``
            (one outer state per fragment), ``compression``, ``overlap_steps`` (smaller than
            ``k // fragments``). Needs an integer ``k >= fragments``; not with ``local_k`` or
            ``average_optimizer_state`` (default: 1, the whole model in every round).
        manager: a ``torchft.Manager`` (``use_async_quorum=False``): live membership. Each global
            round and ``sync()`` opens with its quorum, runs on its process group, and is kept only
            if every participant commits; a replica group that returns heals from a live peer.
            Call ``opt.managed.start()`` before the first step (it returns the step count to
            train from). See :mod:`localsgd_optim.ft` (default: ``None``).
        round_every_s: time-budgeted rounds instead of every ``k`` steps: each replica steps until
            this many seconds have passed since the last round ended, then joins the round, so
            replicas at different speeds take different step counts and none waits out another's
            period (a fast one waits at most for a slow one's step in progress). Pair it with
            ``step(tokens=n)`` so the mean weights each replica by its work. Rounds are matched
            by count, not step: end training on :attr:`num_rounds` (the same on every replica at
            a round), never on a step count. With ``fragments``, each fragment syncs once
            per ``round_every_s``, in turn. With ``overlap_steps`` the rounds are asynchronous: a
            replica launches its round (control collective included) and trains on, waiting for
            no other, and applies it ``overlap_steps`` of its own steps later or at its next
            launch (end with :meth:`land`, then :meth:`sync`). Sharded replicas (FSDP2, tensor
            parallel) agree on the end of a period with one tiny all-reduce per mesh dimension
            of the replica at every step. Under ``manager`` a heal hands over the round count.
            Not with ``local_k``, ``Join`` or FSDP1; see ``docs/algorithms.md`` (default: ``None``).

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

    # GradScaler hands us ``grad_scale``/``found_inf`` and always calls step(), so a step
    # skipped for inf/NaN gradients still counts and still joins averaging (see _amp.py).
    _step_supports_amp_scaling = True

    def __init__(
        self,
        optimizer: Optimizer,
        k: PeriodSpec | None = None,
        *,
        process_group: dist.ProcessGroup | Any | None = None,
        bucket_cap_mb: float = 25.0,
        sync_on_init: bool = True,
        warmup_steps: int = 0,
        local_k: int | None = None,
        local_group: dist.ProcessGroup | None = None,
        buffers: nn.Module | None = None,
        outer_optimizer: OuterFactory | None = None,
        compression: str | Compression | None = None,
        overlap_steps: int = 0,
        overlap_mix: float | None = None,
        check_finite: bool = True,
        flat_params: bool = True,
        average_optimizer_state: bool = False,
        fragments: int = 1,
        manager: Any | None = None,
        round_every_s: float | None = None,
    ) -> None:
        if isinstance(optimizer, LocalSGDOptimizer):
            raise TypeError("optimizer is already a LocalSGDOptimizer; wrap the inner optimizer once")
        if manager is not None:
            pg = getattr(manager, "_pg", None)
            if pg is None:
                raise TypeError(f"manager must be a torchft.Manager (built with pg=...), got {type(manager).__name__}")
            if process_group is not None and process_group is not pg:
                raise ValueError("LocalSGDOptimizer: with manager=, leave process_group=None (the rounds run on the "
                                 f"manager's process group), got process_group={process_group!r}")
            process_group = pg
        config = Config.from_args(
            optimizer, k, process_group=process_group, bucket_cap_mb=bucket_cap_mb, sync_on_init=sync_on_init,
            warmup_steps=warmup_steps, local_k=local_k, local_group=local_group, buffers=buffers,
            outer_optimizer=outer_optimizer, compression=compression, overlap_steps=overlap_steps,
            overlap_mix=overlap_mix, check_finite=check_finite, flat_params=flat_params,
            average_optimizer_state=average_optimizer_state, fragments=fragments, round_every_s=round_every_s)
        self._constructed = False
        super().__init__(optimizer.param_groups, optimizer.defaults)
        Joinable.__init__(self)  # Optimizer.__init__ does not chain to it
        self.optimizer = optimizer
        self._share_inner()
        self._config = config
        sharding = find_sharding(self.param_groups, config.process_group)
        replica_groups = sharding.replica_groups() if sharding is not None and round_every_s is not None else []
        if replica_groups is None:
            raise ValueError(
                f"LocalSGDOptimizer: round_every_s={round_every_s!r} with FSDP1 is not supported: the ranks of one "
                "replica must agree at every step on the end of the period, over groups a device mesh describes; "
                "shard with FSDP2 (fully_shard) or pass k instead")
        if sharding is not None and config.flat_params and sharding.fallbacks():
            warnings.warn(
                "LocalSGDOptimizer: some sharded parameters take the copy path (each round copies their "
                f"local shard in and out) instead of zero-copy flat storage: {'; '.join(sharding.fallbacks())}",
                UserWarning, stacklevel=2)
        self._members = Members(self, config.buffers, config.average_optimizer_state, sharding)
        self._ddp_modules: list[nn.Module] = []  # registered by no_sync(): DDP syncs during warmup
        self._binding: Binding | None = None
        self._single = False  # bound to a world of one: never communicate
        self._pending_broadcast = config.sync_on_init
        #: runs each global round and ``sync()`` in its place (``guard(round, joined)``, which calls
        #: ``_run``): a membership engine's quorum and vote around it (:class:`localsgd_optim.ft.Managed`,
        #: which may run another round after a heal); ``None``: the round alone
        self._round_guard: Callable[[Round, bool], None] | None = None
        self._stats = {"rounds": 0, "bytes_sent": 0, "round_seconds": 0.0}
        self._tokens: int | None = None  # step(tokens=) since the last global round: this rank's weight
        self._constructed = True
        # Built before binding, so the bind check compares them across ranks; a global copy is
        # re-taken right after the binding broadcast, so it starts identical everywhere.
        self._cursor, self._rounds = build_rounds(
            config, self._members.params(), self._members.optimizer_state_tensors)
        if replica_groups:  # sharded replicas: every rank of a replica ends the period at the same step
            self._cursor.agree = functools.partial(  # type: ignore[attr-defined]
                self._due_in_replica, replica_groups, is_nccl(replica_groups[0]))
        #: the :class:`localsgd_optim.ft.Managed` running the rounds under ``manager`` (``None`` without)
        self.managed: Any = None
        if manager is None:
            self._bind()
        else:  # membership is the manager's: the optimizer binds inside rounds, after each new quorum
            from .ft import Managed

            self.managed = Managed(self, manager)

    def _share_inner(self) -> None:
        # Same objects, not copies: an LR set on the wrapper is the LR the inner step uses.
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        self.defaults = self.optimizer.defaults

    # The settings, read-only: each is the validated value in the Config (a changed one would not
    # reach the rounds, which were built from it, nor the cross-rank check).
    process_group = _setting("process_group", "The ranks averaged over (``None``: the default group).")
    local_group = _setting("local_group", "This rank's group for hierarchical ``local_k`` rounds, or ``None``.")
    local_k = _setting("local_k", "Steps between hierarchical rounds after warmup (0: none).")
    bucket_cap_mb = _setting("bucket_cap_mb", "The largest bucket, in MiB.")
    check_finite = _setting("check_finite", "Whether each round first checks every rank for NaN/Inf.")
    compression = _setting("compression", "How outer rounds' pseudo-gradients travel: ``None``, ``'bf16'``, ``'int8'``, "
                           "``'int4'``, ``'int2'`` or a :class:`~localsgd_optim.Compression` (``quantize(bits, "
                           "collective='reduce_scatter')``: for many ranks).")
    overlap_steps = _setting("overlap_steps", "Local steps an overlapped round stays in flight (0: blocking).")
    overlap_mix = _setting("overlap_mix", "The weight kept of the local parameters when an overlapped round lands.")
    flat_params = _setting("flat_params", "Whether the parameters live in flat storage (``False``: the copy engine).")
    average_optimizer_state = _setting("average_optimizer_state", "Whether rounds average the inner state too.")
    fragments = _setting("fragments", "Streaming fragments the model is synced in.")
    buffers_module = _setting("buffers", "The module whose floating buffers are averaged, or ``None``.")

    @property
    def k(self) -> PeriodSpec:
        """The period: an int, or the schedule it was given as."""
        return self._config.schedule.spec

    @property
    def warmup_steps(self) -> int:
        return self._config.schedule.warmup_steps

    @property
    def num_steps(self) -> int:
        """Calls of :meth:`step` so far (restored by :meth:`load_state_dict`)."""
        return self._cursor.step

    @property
    def num_rounds(self) -> int:
        """Scheduled global rounds so far, after warmup (restored by :meth:`load_state_dict`). With
        ``round_every_s`` it is what every replica shares, whatever its step count."""
        return self._cursor.rounds

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """With ``round_every_s``: the period's clock stops inside the block, so an evaluation or a
        checkpoint between steps does not eat into the replicas' training time. Enter it at the same
        point on every rank (e.g. right after a round). Without ``round_every_s`` it does nothing.
        """
        self._cursor.pause()
        try:
            yield
        finally:
            self._cursor.resume()

    @property
    def period_spent_s(self) -> float:
        """With ``round_every_s``: the seconds spent in the current period (0 during warmup), e.g. for an
        LR schedule that follows the shared progress ``(num_rounds + period_spent_s / T) / rounds``."""
        return self._cursor.spent()

    @property
    def round_every_s(self) -> float | None:
        """The time budget of a period in seconds (``None``: rounds every ``k`` steps)."""
        return getattr(self._config.schedule, "seconds", None)

    @property
    def engine(self) -> Any:
        """The bucket engine of the bound process group (``None`` unbound or alone). Internal:
        for benchmarks and tests; its interface may change."""
        return self._binding.engine if self._binding is not None else None

    # -- the process group and the rounds ---------------------------------------------------

    def _due_in_replica(self, groups: list[dist.ProcessGroup], nccl: bool, due: bool) -> bool:
        """Whether any rank of this replica has spent the period (one tiny ``MAX`` per mesh dimension:
        FSDP and tensor parallelism already run collectives over these ranks at every step)."""
        device = self._members.device() if nccl else None
        return on_any_rank(due, groups, device if device is not None else torch.device("cpu"))

    def _settings(self) -> dict[str, Any]:
        return self._config.settings(self._rounds.outer_optimizer())

    def _bind(self) -> Binding | None:
        """Bind to the process group once it exists; ``None`` means a single process (for now).

        Binding is a collective: every rank checks that all wrap the same parameters and
        settings, then (``sync_on_init``) parameters are broadcast from the group's first
        rank, the frozen ones (``requires_grad=False``, never averaged) included. A group
        initialized after construction is bound at the next ``step()``.
        """
        if self._binding is not None or self._single:
            return self._binding
        world_size = group_size(self.process_group)
        if world_size == 1:
            self._single = dist.is_available() and dist.is_initialized()
            return None
        binding = self._binding = self._new_binding(self.process_group, world_size)
        try:
            binding.control(RoundKind.BIND, binding.engine.prepare)
        except BaseException:
            self._binding = None  # not bound: the next step() or sync() tries again
            raise
        if self._pending_broadcast:
            src = dist.get_global_rank(binding.group or dist.group.WORLD, 0)
            binding.engine.broadcast(src, binding.group)
            frozen = self._members.frozen()  # never averaged, but replicas start identical (as DDP's do)
            if frozen:  # (every rank agrees: requires_grad is in the layout the bind checked)
                BucketEngine(frozen, bucket_cap_bytes(self.bucket_cap_mb), flat_params=False).broadcast(
                    src, binding.group)  # their own storage: only the averaged parameters move
            self._pending_broadcast = False
            self._rounds.restart(self._members.params(), self._context(binding, refresh=True))  # bound late: re-take the global copy
        if self._cursor.step == 0:
            self._cursor.round_done()  # round_every_s: the first period starts now, on every rank alike
        return binding

    def _new_binding(self, group: dist.ProcessGroup | None, world_size: int) -> Binding:
        return Binding(group, world_size, self._members, self._settings, self.bucket_cap_mb, self.flat_params,
                       self._rounds.breaks(len(self._members.params())), self.check_finite, self._cursor)

    def _context(self, binding: Binding, local: bool = False, refresh: bool = False) -> RoundContext:
        """What a round works on: every parameter, and the averaged buffers after them (the engine's
        tensors, refreshed by the control collective; ``refresh`` for a landing or a restart)."""
        n = binding.refresh() if refresh else binding.engine.movable
        engine = binding.engine
        group = self.local_group if local else binding.group
        size = dist.get_world_size(group) if local else binding.world_size
        return RoundContext(engine.tensors[:n], self._members.names, engine, group, size, self.num_steps,
                            0, n, len(engine.tensors), self._cursor.landing, digest=binding.digest)

    def _run(self, round_: Round, joined: bool = False) -> None:
        """Drive one round: prepare locally, agree in the control collective, run the collectives."""
        binding = self._bind()
        if binding is None:
            round_.alone(self._members.params())
            if not round_.local:
                self._tokens = None
            return
        step = self.num_steps
        ctx: RoundContext | None = None

        def prepare() -> None:  # after the control's re-planning: the context sees the current engine
            nonlocal ctx
            ctx = self._context(binding, round_.local)
            round_.prepare(ctx)
            for rider in round_.riders:
                rider.prepare(ctx)

        weight = -1 if round_.local or self._tokens is None else self._tokens  # (local rounds: unweighted)
        group = self.local_group if round_.local else binding.group
        start = time.perf_counter()
        try:
            with binding.errors(lambda: round_.describe(step)):
                if round_.asynchronous:  # the control collective goes out with the data: nobody waits here
                    agreement = binding.start_control(round_.kind, prepare, joined, group, weight=weight,
                                                      async_op=True)
                    round_.launch(ctx, agreement, joined, weight, self._cursor.landing)
                else:
                    share = binding.control(round_.kind, prepare, joined, group, round_.riders, weight)
                    assert ctx is not None
                    contributors, ctx.weight = share.divisor, weight if share.weighted else None
                    joined = joined or (share.by_work and weight == 0)  # no work since the last round: send nothing
                    round_.run(ctx, contributors, joined)
                    for rider in round_.riders:
                        rider.reduce(ctx, contributors, joined)
            self._stats["rounds"] += 1
            if not round_.local:
                self._tokens = None  # the next round weighs the work done from here
        finally:
            self._stats["bytes_sent"] += ctx.sent if ctx is not None else 0
            self._stats["round_seconds"] += time.perf_counter() - start

    def _land(self) -> None:
        """Phase two of a delayed round: wait for its collectives, then apply it.

        An asynchronous round's wait does not count in the period (the clock stands still): a
        replica that waits here for a later one's launch starts its next period that much later,
        so the replicas' launches stay together instead of drifting a period apart."""
        round_ = self._rounds.scheduled
        start = time.perf_counter()
        try:
            if self._binding is not None:
                with self._binding.errors(lambda: f"the overlapped round applied at step {self.num_steps}"):
                    self._cursor.pause()
                    try:
                        round_.wait()
                    finally:
                        self._cursor.resume()
                self._members.before_round()
            round_.land(self._context(self._binding, refresh=True) if self._binding is not None else None)
        finally:
            self._stats["round_seconds"] += time.perf_counter() - start

    def stats(self) -> dict[str, Any]:
        """What averaging cost this rank so far (this process; not saved in checkpoints).

        Returns:
            ``rounds``: averaging rounds completed with the process group (warmup, scheduled,
            local and ``sync()``; none in a single process); ``bytes_sent``: the payload this
            rank handed to the rounds' data collectives (a ring all-reduce puts about twice that
            on the wire); ``round_seconds``: wall time inside rounds, control collective and
            landing of overlapped rounds included. A non-averaging ``step()`` touches none of them.
        """
        return dict(self._stats)

    # -- stepping ---------------------------------------------------------------------------

    def step(self, closure: Callable[[], float] | None = None, *, tokens: int | None = None) -> Any:  # type: ignore[override]
        """Take one inner step; inside every ``k``-th call, then average parameters.

        Args:
            closure: re-evaluates the model and returns the loss (passed to the inner step).
            tokens: the work this step did (tokens, samples: any count). The global rounds then
                weight each rank's contribution by its total since the last round: ``sum(w_r *
                x_r) / sum(w_r)``, exactly the plain mean when the totals are equal (blocking
                rounds; asynchronous ones: equal in value, not bit for bit), and nothing
                from a rank whose total is 0. Pass it at every step on every rank, or never (a
                round where some ranks gave it and others did not raises on every rank). With
                compression each rank encodes its weighted delta (see ``docs/algorithms.md``);
                not with step-counted ``overlap_steps`` (yet; with ``round_every_s`` it works);
                local rounds stay unweighted.

        Returns:
            Whatever the inner optimizer's ``step`` returns (the closure's loss).
        """
        if tokens is not None:
            if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
                raise ValueError(f"step(tokens=...) must be an integer >= 0 (the work this step did), got {tokens!r}")
            self._tokens = (self._tokens or 0) + tokens
        if self._binding is None and not self._single and self._round_guard is None:
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
            loss = inner_step(self, self.optimizer, closure)
            binding = self._binding
            if binding is not None and binding.engine.moved_cheap():  # model.half(), model.to(): free
                binding.engine.release()  # the old storage now, not at the next round
            self._after_step()
        except BaseException:
            # GradScaler deletes its grad_scale/found_inf only after a normal return: drop
            # them here so a later plain step() does not read a stale verdict.
            self.__dict__.pop("grad_scale", None)
            self.__dict__.pop("found_inf", None)
            raise
        return loss

    def _after_step(self, joined: bool = False) -> None:
        """Count a step and run its events (none on most steps: a few int compares)."""
        for event in self._cursor.advance():
            if event == Event.WARMUP_ROUND:
                if not self._ddp_modules:  # DDP all-reduced the gradients: replicas are equal
                    self._run(self._rounds.warmup, joined)
            elif event == Event.WARMUP_END:
                self._set_ddp_grad_sync(False)  # warmup over: local steps from here
                self._rounds.restart(self._members.params(), self._context(self._binding, refresh=True)
                                     if self._binding is not None else None)  # the outer loop starts from here
                self._cursor.round_done()
            elif event == Event.GLOBAL_ROUND:
                self._guarded(self._rounds.scheduled, joined)
                self._cursor.round_done()  # round_every_s: the next period starts now
            elif event == Event.LOCAL_ROUND:
                self._run(self._rounds.local, joined)  # type: ignore[arg-type] - local_k implies it
            else:  # Event.LAND: the overlapped round launched overlap_steps ago
                self._land()

    def _set_ddp_grad_sync(self, on: bool) -> None:
        for module in self._ddp_modules:
            module.require_backward_grad_sync = on

    def no_sync(self, module: nn.Module) -> contextlib.AbstractContextManager[None]:
        """Like :func:`localsgd_optim.no_sync`, but driven by this optimizer's schedule.

        For a DDP module, gradient all-reduce stays on during ``warmup_steps`` (no parameter
        averaging needed then) and turns off when warmup ends, so post-local SGD is
        configured once, by ``warmup_steps``. For any other module it does nothing.
        """
        return scheduled_no_sync(module, self._ddp_modules, sync_now=self.num_steps < self.warmup_steps)

    def sync(self) -> None:
        """Average parameters across ranks now (a collective: call it on every rank).

        Does not shift the schedule. A no-op in a single process. Raises
        :class:`ScheduleMismatchError` on every rank if the ranks' step counts differ.
        Not allowed inside an active ``Join`` block (ranks that joined only shadow
        ``step()``): call it after the block. A round in flight (``overlap_steps``) stays in
        flight: :meth:`land` applies it.
        """
        if self._join_config.enable:
            raise LocalSGDError(
                "LocalSGDOptimizer.sync() inside an active Join block would hang: ranks that have "
                "joined shadow step() only. Call opt.sync() after the `with Join(...)` block."
            )
        self._guarded(self._rounds.sync)

    def land(self) -> None:
        """Apply the overlapped round in flight now, if one is (``overlap_steps``), instead of at its
        landing step: it waits for the round's collectives, which every rank has launched or will.

        A local operation, for the end of training: a run that stops with a round in flight would
        otherwise end without it. With ``round_every_s`` each replica's last launched round is in
        flight when ``num_rounds`` reaches the target: ``opt.land()``, then ``opt.sync()``.
        """
        if self._cursor.landing is not None:
            self._land()
            self._cursor.landed()

    def _guarded(self, round_: Round, joined: bool = False) -> None:
        if self._round_guard is None:
            self._run(round_, joined)
        else:
            self._round_guard(round_, joined)

    # -- torch.distributed.algorithms.Join --------------------------------------------------

    def join_hook(self, **kwargs: Any) -> JoinHook:
        """The hook :class:`~torch.distributed.algorithms.Join` runs on a rank that ran out of data.

        Such a rank keeps counting the others' steps and joins their averaging rounds,
        contributing nothing: the average is over the ranks still training, and the
        joined rank receives it. The optimizer must be the first joinable: ``Join([opt])``
        (a DDP module under :func:`no_sync` needs no Join of its own).
        """
        if self.round_every_s is not None:
            raise LocalSGDError(
                f"LocalSGDOptimizer(round_every_s={self.round_every_s!r}) cannot shadow other ranks under Join: "
                "their rounds follow their clocks, not a step count a joined rank could follow. End training "
                "on opt.num_rounds instead, the same on every rank")
        return _LocalSGDJoinHook(self)

    @property
    def join_device(self) -> torch.device:
        binding = self._bind()
        return binding.control_device if binding is not None else torch.device("cpu")

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
        if self._rounds.per_parameter_state:
            raise ValueError(
                "add_param_group is not supported with an outer_optimizer, compression, "
                "overlap_steps or fragments (their global copy, state and fragments are per "
                "parameter); add every parameter group before constructing LocalSGDOptimizer"
            )
        self.optimizer.add_param_group(param_group)
        self._members.sharding = find_sharding(self.param_groups, self.process_group)
        if self._binding is not None:
            self._binding = self._new_binding(self._binding.group, self._binding.world_size)

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus a versioned ``"local_sgd"`` entry.

        The entry holds only tensors and plain Python values, so
        ``torch.load(..., weights_only=True)`` reads the whole checkpoint.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = self.optimizer.state_dict()
        entry = {"version": STATE_VERSION, "num_steps": self.num_steps,
                 "k": self._config.schedule.description, "warmup_steps": self.warmup_steps}
        if self._tokens is not None:  # step(tokens=) since the last round: the next round's weight
            entry["tokens_since_round"] = self._tokens
        self._cursor.save(entry)  # (round_every_s: the round count and the time spent in the period)
        self._rounds.state(entry)
        state_dict[STATE_KEY] = entry
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` (or a plain optimizer's, with a warning).

        Restores the inner optimizer and the step count, so the schedule resumes at the
        exact phase it was saved in. Every part is validated before anything changes.
        """
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        entry = state_dict.pop(STATE_KEY, None)
        self.load_local_sgd_entry(entry, lambda: self.optimizer.load_state_dict(state_dict))
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def load_local_sgd_entry(self, entry: dict[str, Any] | None, load_inner: Callable[[], None]) -> None:
        """Load the ``"local_sgd"`` ``entry`` of a state dict around ``load_inner``.

        The entry and every round's state in it are validated first; then ``load_inner``
        loads the inner optimizer (and whatever else the caller restores, such as the model:
        it raises before changing anything if its part does not fit); then the Local SGD state
        is applied. :meth:`load_state_dict` and :func:`localsgd_optim.checkpoint.set_state_dict`
        use it; so can other checkpoint integrations.
        """
        num_steps, saved_k = parse_entry(entry)
        self._rounds.check_state(entry)
        position = self._cursor.parse(entry)  # (round_every_s: the round count, the period's time)
        tokens = entry.get("tokens_since_round") if isinstance(entry, dict) else None
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0):
            raise ValueError(f"state_dict[{STATE_KEY!r}]['tokens_since_round'] must be an integer >= 0, got {tokens!r}")
        mine = self._config.schedule.description
        if saved_k is not None and saved_k != mine:
            warnings.warn(
                f"The checkpoint was saved with {_when(saved_k)}; this optimizer has {_when(mine)}. "
                f"Continuing from step {num_steps} with {_when(mine)}.",
                UserWarning,
                stacklevel=3,
            )
        if self._cursor.landing is not None:  # a round in flight: its verdict (which may raise) before any change
            self._rounds.scheduled.wait()
        load_inner()
        self._share_inner()  # load_state_dict rebinds the inner param_groups and state
        self._rounds.load_state(entry, self._members.params())
        self._cursor.seek(num_steps, *position)  # (step-counted: the next round is derived, not stored)
        self._tokens = tokens
        self._set_ddp_grad_sync(num_steps < self.warmup_steps)

    def __getstate__(self) -> dict[str, Any]:
        if self.process_group is not None or self.local_group is not None:
            raise TypeError(
                "cannot pickle or deepcopy a LocalSGDOptimizer with an explicit process_group (process "
                "groups do not pickle); build a new LocalSGDOptimizer around the copied inner optimizer"
            )
        state = self.__dict__.copy()
        state["_binding"], state["_single"] = None, False  # rebinds to the default group on next use
        return state

    def __repr__(self) -> str:
        inner = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        return (
            f"{type(self).__name__}({_when(self._config.schedule.description)}, warmup_steps={self.warmup_steps}, "
            f"num_steps={self.num_steps}, "
            f"bucket_cap_mb={self.bucket_cap_mb},\n{inner}\n)"
        )


def _when(description: Any) -> str:
    """``k=8``, or ``round_every_s=30.0``: a schedule's description as the argument that sets it."""
    if isinstance(description, dict) and "round_every_s" in description:
        return f"round_every_s={description['round_every_s']!r}"
    return f"k={description}"
