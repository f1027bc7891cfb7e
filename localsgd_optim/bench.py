"""Benchmark one averaging round against the flat all-reduce limit, side by side in one run.

Launch with torchrun on the cluster you care about:

    torchrun --nproc-per-node 2 -m localsgd_optim.bench
    torchrun --nnodes 2 --nproc-per-node 8 ... -m localsgd_optim.bench --bucket-cap-mb 5,25,100 --json out.json

For each model it times, interleaved round by round (so drift hits every method
alike): the flat limit (one all-reduce of one pre-allocated buffer holding the same
bytes, no packing), the floors of an averaging round on that buffer (one all-reduce with
``AVG``; a NaN check's read pass, a ``SUM`` and a divide; a ``SUM`` and a divide), a
blocking all-reduce per parameter, an async all-reduce per parameter (torchft's
LocalSGD), torch's ``average_parameters`` (PeriodicModelAverager), and
``LocalSGDOptimizer.sync()`` for each bucket cap. A round's time is the slowest
rank's. It also measures the extra peak memory of a cold round (peak RSS on CPU,
``max_memory_allocated`` on CUDA) and the cost of a non-averaging ``step()`` relative to
the bare inner optimizer's.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .compression import quantize, topk
from .optimizer import LocalSGDOptimizer
from .rounds import RoundContext

__all__ = ["main", "build_model"]


def build_model(layers: int, width: int) -> nn.Module:
    """``nn.TransformerEncoder`` with ``layers`` layers of width ``width`` (FFN 4x width)."""
    layer = nn.TransformerEncoderLayer(width, max(1, width // 64), 4 * width, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


# -- memory ---------------------------------------------------------------------------------

class PeakMemory:
    """Extra peak memory of a region: CUDA allocator stats, or peak RSS on CPU (Linux)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu_ok = device.type == "cpu" and os.path.exists("/proc/self/clear_refs")
        self.libc = None
        if self.cpu_ok:
            try:
                # Fix glibc's mmap threshold at 64 KiB so large buffers are mmapped and
                # returned on free: RSS then follows live tensor memory.
                self.libc = ctypes.CDLL("libc.so.6")
                self.libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
            except (OSError, AttributeError):
                self.cpu_ok = False

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    def measure(self, fn: Callable[[], None]) -> float | None:
        """Bytes above the starting level at the peak of ``fn()``; ``None`` if unmeasurable."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            fn()
            torch.cuda.synchronize(self.device)
            return float(torch.cuda.max_memory_allocated(self.device) - base)
        if not self.cpu_ok:
            fn()
            return None
        self.libc.malloc_trim(0)  # free arena pages would otherwise be reused unseen
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = self._status("VmRSS:")
        fn()
        return float(self._status("VmHWM:") - base)


# -- the contenders -------------------------------------------------------------------------

class Contender:
    """One way of averaging ``params``.

    ``prepare`` does one-time work outside the memory measurement (object construction);
    ``setup`` allocates what the method keeps, and is measured with the first ``round``.
    """

    #: its data collective is an all-gather: a ring sends (W - 1) x the payload, not 2 (W - 1) / W x
    gathered = False

    def __init__(self, name: str, params: list[torch.Tensor], world: int) -> None:
        self.name, self.params, self.world = name, params, world

    def prepare(self) -> None:
        pass

    def setup(self) -> None:
        pass

    def between(self) -> None:
        """What happens between two rounds (training), not timed."""

    def round(self) -> None:
        raise NotImplementedError


class FlatLimit(Contender):
    def setup(self) -> None:
        numel = sum(p.numel() for p in self.params)
        self.buf = torch.zeros(numel, dtype=self.params[0].dtype, device=self.params[0].device)

    def round(self) -> None:
        dist.all_reduce(self.buf)


class FlatAvg(FlatLimit):
    """The floor of an average: one all-reduce of the flat buffer with ``AVG`` (NCCL; gloo takes it
    for floating tensors too)."""

    def round(self) -> None:
        dist.all_reduce(self.buf, op=dist.ReduceOp.AVG)


class FloorSumDivide(FlatLimit):
    """The floor of an average where the backend sums: one flat ``SUM``, then one ``div_`` pass.
    With ``check``, first one read pass (``sum``) over the buffer: what the NaN check costs."""

    def __init__(self, name: str, params: list[torch.Tensor], world: int, check: bool) -> None:
        super().__init__(name, params, world)
        self.check = check

    @torch.no_grad()
    def round(self) -> None:
        if self.check:
            self.total = self.buf.sum()  # kept, so the read pass is not dead code
        dist.all_reduce(self.buf, op=dist.ReduceOp.SUM)
        self.buf.div_(self.world)


class PerParamBlocking(Contender):
    @torch.no_grad()
    def round(self) -> None:
        for p in self.params:
            dist.all_reduce(p)
            p.div_(self.world)


class PerParamAsync(Contender):
    @torch.no_grad()
    def round(self) -> None:
        works = [dist.all_reduce(p, async_op=True) for p in self.params]
        for w in works:
            w.wait()
        torch._foreach_div_(self.params, self.world)


class TorchAverageParameters(Contender):
    def round(self) -> None:
        from torch.distributed.algorithms.model_averaging.utils import average_parameters

        average_parameters(iter(self.params), dist.group.WORLD)


class Ours(Contender):
    """``LocalSGDOptimizer.sync()`` with ``options``; ``cls``: this version's optimizer or a baseline's."""

    def __init__(self, name: str, params: list[torch.Tensor], world: int, cap_mb: float,
                 cls: type = LocalSGDOptimizer, **options: Any) -> None:
        super().__init__(name, params, world)
        self.cap_mb, self.cls, self.options = cap_mb, cls, options

    def prepare(self) -> None:
        # lr=0: the inner optimizer exists only to carry the parameters. Binding moves them into
        # flat storage (once, not measured); the copy engine's buffers are allocated in the first
        # round, which is measured.
        inner = torch.optim.SGD(self.params, lr=0.0)
        self.opt = self.cls(inner, k=1 << 30, bucket_cap_mb=self.cap_mb, sync_on_init=False, **self.options)

    def round(self) -> None:
        self.opt.sync()


class OursBF16(Ours):
    """A full compressed outer round: deltas, control, bf16 data phase, outer step, write-back."""

    wire_factor = 0.5  # bytes each rank contributes, relative to fp32
    compression = "bf16"

    def prepare(self) -> None:
        # Every step is a scheduled (outer) round; the inner SGD has no gradients to apply.
        inner = torch.optim.SGD(self.params, lr=0.0)
        self.opt = self.cls(inner, k=[(None, 1)], bucket_cap_mb=self.cap_mb, compression=self.compression)

    def round(self) -> None:
        self.opt.step()


class OursInt8(OursBF16):
    """A full int8 round with error feedback: codes and per-tensor scales all-gathered per bucket."""

    wire_factor = 0.25
    compression = "int8"
    gathered = True


class OursCompressed(OursInt8):
    """A full round with a top-k / low-bit compressor and error feedback; its payload is measured
    (``stats()['bytes_sent']`` per round), not assumed. The parameters move between rounds (a fixed
    random walk per rank), so top-k picks from real deltas, not from zeros."""

    def __init__(self, name: str, params: list[torch.Tensor], world: int, cap_mb: float, compression: Any,
                 cls: type = LocalSGDOptimizer) -> None:
        super().__init__(name, params, world, cap_mb, cls)
        self.compression = compression
        self.wire_factor = 0.0
        # a reduce-scatter round hands one payload to its all-to-all and sends 2 (W - 1) / W of it, like a ring
        self.gathered = getattr(compression, "collective", "all_gather") == "all_gather"
        self._drift: list[torch.Tensor] = []

    def prepare(self) -> None:
        super().prepare()
        g = torch.Generator(device=self.params[0].device).manual_seed(dist.get_rank())
        self._drift = [torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype) * 1e-3 for p in self.params]

    @torch.no_grad()
    def between(self) -> None:
        torch._foreach_add_(self.params, self._drift)  # local progress since the last round

    def round(self) -> None:
        before = self.opt.stats()["bytes_sent"]
        self.opt.step()
        nbytes = sum(p.numel() * p.element_size() for p in self.params)
        self.wire_factor = (self.opt.stats()["bytes_sent"] - before) / nbytes


class _NoWire:
    """A finished collective: what the compute floor's gathers return."""

    def wait(self) -> None:
        pass


def _no_wire(out: torch.Tensor, mine: torch.Tensor, group: Any, async_op: bool = False) -> _NoWire | None:
    """The wire replaced by local copies: every rank's slot gets this rank's payload."""
    out.view(-1, mine.numel()).copy_(mine)
    return _NoWire() if async_op else None


def _no_wire_scatter(out: torch.Tensor, slots: torch.Tensor, group: Any) -> None:
    """An all-to-all replaced by local copies: every rank's slot for rank 0 is this rank's (rank 0's)."""
    world = dist.get_world_size(group)
    out.view(world, -1).copy_(slots.view(world, -1)[0])


class CompressFloor(OursCompressed):
    """The compute floor of a compressed round: ``v``, encode, and the decode of W payloads, each bucket
    as in a round, with the wire replaced by W local copies of this rank's payload, and no control
    collective, deltas or outer step: round minus floor is about the wire. ``setup`` runs one whole
    round (no wire either): plans and buffers, measured with the first floor for the extra peak."""

    gathered = True

    def prepare(self) -> None:
        super().prepare()
        self.reducer = self.opt._rounds.scheduled.reducer
        self.reducer._gather = _no_wire
        self.reducer._scatter = _no_wire_scatter  # (a reduce-scatter round's all-to-all)

    def setup(self) -> None:
        OursCompressed.round(self)
        self.wire_factor = 0.0  # nothing is sent

    @torch.no_grad()
    def round(self) -> None:
        engine, n = self.opt.engine, len(self.params)
        ctx = RoundContext(self.params, lambda: [], engine, None, self.world, 0, 0, n, n)
        self.reducer.reduce(ctx, self.world, False, engine.flats(0, n)[1])

    def payload_bytes(self) -> int:
        """Bytes this rank hands to a round's all-gathers (every bucket's payload)."""
        engine = self.opt.engine
        if hasattr(self.reducer, "_plan"):
            return sum(self.reducer._plan(b).parts["total"][1] for b in engine.buckets)
        return sum(b.numel + 4 * len(b.indices) for b in engine.buckets)  # int8: codes and scales


#: the bench's top-k and low-bit compressors: (label, the settings' maker, its arguments)
_RS = {"collective": "reduce_scatter"}
_COMPRESSORS = [("int4", "quantize", (4,), {}), ("int2", "quantize", (2,), {}), ("top-10% fp32", "topk", (0.1,), {}),
                ("top-1% fp32", "topk", (0.01,), {}), ("top-3% 2-bit", "topk", (0.03,), {"bits": 2}),
                ("top-1% 2-bit", "topk", (0.01,), {"bits": 2}), ("8-bit", "quantize", (8,), {}),
                ("8-bit rs", "quantize", (8,), _RS), ("int4 rs", "quantize", (4,), _RS),
                ("int2 rs", "quantize", (2,), _RS)]
#: (label, compression) of this version
COMPRESSORS = [(label, {"quantize": quantize, "topk": topk}[maker](*a, **kw)) for label, maker, a, kw in _COMPRESSORS]


def _picked(compressors: list, labels: list[str] | None) -> list:
    return [c for c in compressors if labels is None or c[0] in labels]


def _contenders(model: nn.Module, world: int, caps: list[float], only: set[str] | None,
                baseline: str | None = None, picked: list[str] | None = None) -> list[Contender]:
    """Every contender gets its own copy of the model: ours moves its parameters into flat storage,
    and torch's ``average_parameters`` rebinds them to a new buffer every round. ``baseline``
    names another importable copy of this package (an older version): its rounds run beside ours.
    ``only`` selects by key (see ``METHODS``); the flat limit, every ratio's reference, always runs."""

    def params() -> list[torch.Tensor]:
        return [p.detach().clone().requires_grad_() for p in model.parameters()]

    # The floors only read the parameters' sizes and dtype and reduce a buffer of their own.
    shapes = [p.detach() for p in model.parameters()]
    makers: dict[str, Callable[[], Contender]] = {
        "flat": lambda: FlatLimit("flat limit (1 all-reduce, no packing)", params(), world),
        "flat_avg": lambda: FlatAvg("flat AVG", shapes, world),
        "floor_check": lambda: FloorSumDivide("floor: check + SUM + divide", shapes, world, check=True),
        "floor": lambda: FloorSumDivide("floor: SUM + divide", shapes, world, check=False),
        "blocking": lambda: PerParamBlocking("per-parameter blocking", params(), world),
        "async": lambda: PerParamAsync("per-parameter async (torchft)", params(), world),
        "torch": lambda: TorchAverageParameters("torch average_parameters", params(), world),
    }
    out: list[Contender] = [make() for key, make in makers.items() if key == "flat" or not only or key in only]
    if not only or "ours" in only:
        out += [Ours(f"localsgd_optim sync (cap {c:g} MB)", params(), world, c) for c in caps]
        # the NaN guard's cost: the first cap again, without it; and the copy engine
        out.append(Ours(f"localsgd_optim sync (cap {caps[0]:g} MB, check_finite=False)", params(), world,
                        caps[0], check_finite=False))
        out.append(Ours(f"localsgd_optim sync (cap {caps[0]:g} MB, flat_params=False)", params(), world,
                        caps[0], flat_params=False))
        out.append(OursBF16(f"localsgd_optim bf16 deltas (cap {caps[0]:g} MB)", params(), world, caps[0]))
        out.append(OursInt8(f"localsgd_optim int8 deltas+EF (cap {caps[0]:g} MB)", params(), world, caps[0]))
    if only and "compressors" in only:  # issue 26's compressors, each a full round with error feedback
        # and its compute floor; int8 (the other error-feedback round) with them
        out.append(CompressFloor(f"  floor, no wire: int8 encode+decode", params(), world, caps[0], "int8"))
        for label, spec in _picked(COMPRESSORS, picked):
            out.append(OursCompressed(f"localsgd_optim {label} +EF", params(), world, caps[0], spec))
            out.append(CompressFloor(f"  floor, no wire: {label} encode+decode", params(), world, caps[0], spec))
    if baseline:
        cls = importlib.import_module(baseline).LocalSGDOptimizer
        name = f"baseline {baseline}"
        out += [Ours(f"{name} sync (cap {caps[0]:g} MB)", params(), world, caps[0], cls),
                Ours(f"{name} sync (cap {caps[0]:g} MB, check_finite=False)", params(), world, caps[0], cls,
                     check_finite=False),
                OursBF16(f"{name} bf16 deltas (cap {caps[0]:g} MB)", params(), world, caps[0], cls),
                OursInt8(f"{name} int8 deltas+EF (cap {caps[0]:g} MB)", params(), world, caps[0], cls)]
        if only and "compressors" in only:
            theirs = importlib.import_module(baseline)  # its own settings' classes
            out.append(CompressFloor(f"  {name} floor, no wire: int8 encode+decode", params(), world, caps[0],
                                     "int8", cls))
            for label, maker, a, kw in _picked(_COMPRESSORS, picked):
                try:
                    spec = getattr(theirs, maker)(*a, **kw)
                except TypeError:  # a setting the older version does not have (collective=)
                    continue
                out += [OursCompressed(f"{name} {label} +EF", params(), world, caps[0], spec, cls),
                        CompressFloor(f"  {name} floor, no wire: {label} encode+decode", params(), world,
                                      caps[0], spec, cls)]
    return out


# -- measurement ----------------------------------------------------------------------------

def _slowest(times: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _max_over_ranks(value: float | None, device: torch.device) -> float | None:
    t = torch.tensor([-1.0 if value is None else value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return None if t.item() < 0 else t.item()


def _sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_rounds(model: nn.Module, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Median round time per method, interleaved round by round; the slowest rank counts."""
    world = dist.get_world_size()
    params = [p for p in model.parameters()]
    contenders = _contenders(model, world, args.bucket_cap_mb, set(args.methods) if args.methods else None,
                             args.baseline, args.compressors)
    for c in contenders:
        c.prepare()
        c.setup()
    times: dict[str, list[float]] = {c.name: [] for c in contenders}
    for r in range(args.warmup + args.rounds):
        for c in contenders:
            c.between()
            dist.barrier()
            _sync_device(device)
            t0 = time.perf_counter()
            c.round()
            _sync_device(device)
            if r >= args.warmup:
                times[c.name].append(time.perf_counter() - t0)
    nbytes = sum(p.numel() * p.element_size() for p in params)
    rows = []
    for c in contenders:
        slowest = _slowest(times[c.name], device)
        rows.append({"method": c.name, "median_ms": 1e3 * statistics.median(slowest)})
    flat = rows[0]["median_ms"]
    for row, c in zip(rows, contenders):
        row["ratio_to_flat"] = row["median_ms"] / flat
        row["payload_mb"] = getattr(c, "wire_factor", 1.0) * nbytes / 2**20  # bytes each rank hands in
        row["wire_mb_per_rank"] = row["payload_mb"] * ((world - 1) if c.gathered else 2 * (world - 1) / world)
    return rows


def bench_memory(model: nn.Module, args: argparse.Namespace, device: torch.device, mem: PeakMemory) -> dict:
    """Extra peak memory of a cold round per method: what it allocates and keeps, plus the round."""
    world = dist.get_world_size()
    extra: dict[str, float | None] = {}
    for c in _contenders(model, world, args.bucket_cap_mb, set(args.methods) if args.methods else None,
                         args.baseline, args.compressors):
        c.prepare()  # one-time construction is not part of a round
        dist.barrier()
        value = _max_over_ranks(mem.measure(lambda c=c: (c.setup(), c.round(), _sync_device(device))), device)
        extra[c.name] = None if value is None else value / 2**20
    return extra


@torch.no_grad()
def bench_breakdown(model: nn.Module, args: argparse.Namespace, device: torch.device) -> dict:
    """Time the phases of one LocalSGDOptimizer round separately (largest cap swept)."""
    from ._dist import RoundKind, agree_on_round

    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    opt = LocalSGDOptimizer(torch.optim.SGD(params, lr=0.0), k=1 << 30,
                            bucket_cap_mb=max(args.bucket_cap_mb), sync_on_init=False)
    opt.sync()  # allocate buffers
    engine = opt.engine
    _, flats = engine.flats()  # the flat storage, per (device, dtype)
    slices = engine.bucket_slices(flats, 0, len(engine.tensors))

    def stage() -> None:  # staged tensors (module buffers, shared memory) copied in and out
        engine.stage_in()
        engine.stage_out()

    def divide() -> None:  # divide by 1: same cost, leaves the values alone (once per flat buffer)
        for flat in flats:
            flat.div_(1)

    def comm_only() -> None:
        works = [dist.all_reduce(s, async_op=True) for s in slices]
        for w in works:
            w.wait()

    def nan_scan() -> None:
        engine.first_nonfinite()

    def control() -> None:
        agree_on_round(None, torch.device("cpu") if dist.get_backend() != "nccl" else device,
                       RoundKind.SYNC, 0, 0, 0, lambda: None)

    phases = {"stage in + out": stage, "bucketed all-reduce only": comm_only, "divide": divide,
              "NaN scan": nan_scan, "control collective": control, "whole round (sync)": opt.sync}
    out: dict[str, float] = {}
    for name, fn in phases.items():
        ts = []
        for r in range(args.warmup + args.rounds):
            dist.barrier()
            _sync_device(device)
            t0 = time.perf_counter()
            fn()
            _sync_device(device)
            if r >= args.warmup:
                ts.append(time.perf_counter() - t0)
        out[name] = 1e3 * statistics.median(_slowest(ts, device))
    out["buckets"] = len(engine.buckets)
    return out


def bench_step_overhead(model: nn.Module, args: argparse.Namespace, device: torch.device) -> dict:
    """Median time of a bare AdamW step vs. a non-averaging LocalSGDOptimizer step, interleaved."""
    params = list(model.parameters())
    g = torch.Generator(device="cpu").manual_seed(0)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(device)
    bare = torch.optim.AdamW(params, lr=1e-6)
    wrapped = LocalSGDOptimizer(torch.optim.AdamW(params, lr=1e-6), k=1 << 30, sync_on_init=False)
    for _ in range(2):
        bare.step()
        wrapped.step()
    t_bare, t_wrapped = [], []
    for i in range(args.step_reps):
        # alternate the order so neither side always runs second (cache effects)
        for opt, bucket in ((bare, t_bare), (wrapped, t_wrapped)) if i % 2 == 0 else \
                ((wrapped, t_wrapped), (bare, t_bare)):
            _sync_device(device)
            t0 = time.perf_counter()
            opt.step()
            _sync_device(device)
            bucket.append(time.perf_counter() - t0)
    for p in params:
        p.grad = None
    mb, mw = statistics.median(t_bare), statistics.median(t_wrapped)
    return {"bare_step_ms": 1e3 * mb, "wrapped_step_ms": 1e3 * mw, "ratio": mw / mb,
            "overhead_us": 1e6 * (mw - mb)}


def _parse_models(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        try:
            layers, width = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--models must look like '12x512,48x128' (LAYERSxWIDTH), got {text!r}") from None
        out.append((layers, width))
    return out


METHODS = ("flat", "flat_avg", "floor_check", "floor", "blocking", "async", "torch", "ours", "compressors")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m localsgd_optim.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="12x512,48x128", help="LAYERSxWIDTH transformer encoders (default: %(default)s)")
    p.add_argument("--bucket-cap-mb", default="25", help="one or more caps to sweep, e.g. 1,5,25,100")
    p.add_argument("--rounds", type=int, default=10, help="timed rounds per method")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--step-reps", type=int, default=30, help="timed steps for the step() overhead")
    p.add_argument("--methods", nargs="*", choices=METHODS, metavar="METHOD",
                   help="subset of %(choices)s (default: all; the flat limit always runs)")
    p.add_argument("--backend", default=None, help="default: nccl with CUDA, else gloo")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank (CPU)")
    p.add_argument("--breakdown", action="store_true", help="also time each phase of our round")
    p.add_argument("--json", default=None, help="write the results here (rank 0)")
    p.add_argument("--baseline", default=None, metavar="MODULE",
                   help="another importable copy of this package (e.g. an older release installed as "
                        "localsgd_optim_before): its rounds are timed beside ours, in the same run")
    p.add_argument("--compressors", default=None, metavar="LABELS",
                   help="with --methods compressors: a comma-separated subset of "
                        + ", ".join(repr(c[0]) for c in _COMPRESSORS).replace("%", "%%") + " (default: all)")
    p.add_argument("--interleave", action="store_true",
                   help="with --fake-world and --methods compressors: time the compressors round by round in "
                        "turn (each holds its own copies of the model at once), so drift hits them alike")
    p.add_argument("--fake-world", type=int, default=0, metavar="N",
                   help="one process, torch's fake process group of N ranks (collectives move nothing): "
                        "time a round's non-wire cost and count its ops and CUDA kernels, against torch's "
                        "average_parameters")
    args = p.parse_args(argv)
    known = [c[0] for c in _COMPRESSORS]
    args.compressors = known if args.compressors is None else [c.strip() for c in args.compressors.split(",")]
    unknown = [c for c in args.compressors if c not in known]
    if unknown:
        p.error(f"--compressors: unknown {', '.join(map(repr, unknown))}; choose among {', '.join(map(repr, known))}")
    if args.fake_world == 1 or args.fake_world < 0:
        p.error(f"--fake-world must be >= 2 (ranks to pretend), got {args.fake_world}")
    try:
        args.bucket_cap_mb = [float(v) for v in args.bucket_cap_mb.split(",")]
    except ValueError:
        p.error(f"--bucket-cap-mb must be numbers separated by commas, got {args.bucket_cap_mb!r}")
    if args.rounds < 1 or args.warmup < 0 or args.step_reps < 1:
        p.error("--rounds and --step-reps must be >= 1, --warmup >= 0")
    args.models = _parse_models(args.models)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.fake_world:
        return fake_world_main(args, device)
    if device.type == "cuda":
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        if local_ranks > torch.cuda.device_count():
            raise SystemExit(
                f"{local_ranks} ranks on this host but {torch.cuda.device_count()} GPU(s): one rank per GPU "
                "(NCCL refuses two ranks on one GPU). Run with --device cpu, or measure a round's non-wire "
                "cost on one GPU with: python -m localsgd_optim.bench --fake-world 8"
            )
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            raise SystemExit("launch with torchrun, e.g.: torchrun --nproc-per-node 2 -m localsgd_optim.bench")
        dist.init_process_group(args.backend or ("nccl" if device.type == "cuda" else "gloo"))
    rank, world = dist.get_rank(), dist.get_world_size()
    report = {"caps": args.bucket_cap_mb, "world_size": world, "backend": str(dist.get_backend()), "device": str(device),
              "torch": torch.__version__, "models": []}
    for layers, width in args.models:  # timings first, with the allocator left alone
        torch.manual_seed(0)
        model = build_model(layers, width).to(device)
        n = sum(p.numel() for p in model.parameters())
        ntensors = sum(1 for _ in model.parameters())
        rows = bench_rounds(model, args, device)
        step = bench_step_overhead(model, args, device)
        entry = {"layers": layers, "width": width, "params": n, "tensors": ntensors, "rounds": rows, "step": step}
        if args.breakdown:
            entry["breakdown"] = bench_breakdown(model, args, device)
        report["models"].append(entry)
        del model
    mem = PeakMemory(device)  # on CPU this pins glibc's mmap threshold: only after the timings
    for entry in report["models"]:
        torch.manual_seed(0)
        model = build_model(entry["layers"], entry["width"]).to(device)
        extra = bench_memory(model, args, device, mem)
        for row in entry["rounds"]:
            row["extra_peak_mb"] = extra[row["method"]]
        if rank == 0:
            _print_model(entry, report)
        del model
    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    dist.barrier()
    return report


# -- one process, a fake world: the non-wire cost of a round ------------------------------------

class CountOps(TorchDispatchMode):
    """Counts the ops dispatched inside the block (collectives included)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_kernels(fn: Callable[[], None], device: torch.device) -> int | None:
    """CUDA kernels (and copies) launched by ``fn()``; ``None`` off CUDA."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def fake_world_main(args: argparse.Namespace, device: torch.device) -> dict:
    """Time one round of each method on one device, in a fake world whose collectives move nothing."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
        device = torch.device("cuda", torch.cuda.current_device())
    if not dist.is_initialized():
        # Rounds run as they are: their control collective sees a fake group has no peers (every
        # rank is this one, see agree_on_round) and the data collectives move nothing.
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=args.fake_world)
    report: dict[str, Any] = {"fake_world": args.fake_world, "device": str(device), "torch": torch.__version__,
                              "cap_mb": args.bucket_cap_mb[0], "models": []}
    only = set(args.methods or ())
    for layers, width in args.models:
        torch.manual_seed(0)
        model = build_model(layers, width).to(device)
        entry = {"layers": layers, "width": width, "params": sum(p.numel() for p in model.parameters()),
                 "tensors": len(list(model.parameters()))}
        report["models"].append(entry)
        if only != {"compressors"}:  # (alone, the compressors' floors: a large model's copies then fit)
            entry.update(_fake_world_rounds(model, args, device))
            _print_fake_world(entry, args, device)
        if "compressors" in only:
            entry["compressors"] = _fake_world_compressors(model, args, device)
            entry["device"] = str(device)
            _print_fake_world_compressors(entry, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


def _fake_world_rounds(model: nn.Module, args: argparse.Namespace, device: torch.device) -> dict:
    """Each method's round, interleaved, with its ops and CUDA kernels; its ratio to torch's."""
    methods, default = _fake_world_methods(model, args)
    times = _time_interleaved(methods, args, device)
    rows = []
    for name, fn in methods.items():
        with CountOps() as ops:
            fn()
        rows.append({"method": name, "median_ms": 1e3 * statistics.median(times[name]), "ops": ops.count,
                     "cuda_kernels": count_kernels(fn, device)})
    for row in rows:  # the target: at most 0.25x torch's
        row["ratio_to_torch"] = row["median_ms"] / rows[0]["median_ms"]
    return {"buckets": len(default.opt.engine.buckets), "rounds": rows}


def _fake_world_methods(model: nn.Module, args: argparse.Namespace) -> tuple[dict[str, Callable[[], None]], "Ours"]:
    """torch's ``average_parameters`` first, then our rounds, each on its own copy of the parameters."""
    from torch.distributed.algorithms.model_averaging.utils import average_parameters

    def params() -> list[torch.Tensor]:
        return [p.detach().clone().requires_grad_() for p in model.parameters()]

    def ours(**options: Any) -> Ours:
        contender = Ours("", params(), args.fake_world, args.bucket_cap_mb[0], **options)
        contender.prepare()
        return contender

    theirs = params()
    default = ours()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def floor() -> None:  # the NaN check's read and the divide's read + write, nothing else
        flat.sum()
        flat.div_(1)

    return {
        "torch average_parameters": lambda: average_parameters(iter(theirs), dist.group.WORLD),
        "floor: one sum + one div_ over the bytes": floor,
        "localsgd_optim sync": default.round,
        "localsgd_optim sync, check_finite=False": ours(check_finite=False).round,
        "localsgd_optim sync, flat_params=False": ours(flat_params=False).round,
    }, default


def _fake_world_compressors(model: nn.Module, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Each compressed round's compute floor at W = ``--fake-world`` (encode, W decodes, no wire): one
    compressor at a time (each holds a copy of the model, its global copy and residual), timings
    first, then the extra peak of a cold round plus a floor, each on a fresh copy."""
    def floor(label: str, spec: Any) -> CompressFloor:
        params = [p.detach().clone().requires_grad_() for p in model.parameters()]
        contender = CompressFloor(label, params, args.fake_world, args.bucket_cap_mb[0], spec)
        contender.prepare()
        return contender

    rows = []
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    picked = [("int8", "int8")] + _picked(COMPRESSORS, args.compressors)
    together: dict[str, list[float]] = {}
    if args.interleave:  # every compressor at once, timed in turn
        contenders = {label: floor(label, spec) for label, spec in picked}
        for contender in contenders.values():
            contender.setup()
        together = _time_interleaved({label: c.round for label, c in contenders.items()}, args, device)
        del contenders
        gc.collect()
    for label, spec in picked:
        contender = floor(label, spec)
        contender.setup()
        times = together.get(label) or _time_interleaved({label: contender.round}, args, device)[label]
        with CountOps() as ops:
            contender.round()
        w, payload = args.fake_world, contender.payload_bytes() / 2**20
        rows.append({"method": label, "median_ms": 1e3 * statistics.median(times), "ops": ops.count,
                     "payload_mb": payload, "fp32_mb": nbytes / 2**20,
                     "wire_mb": payload * ((w - 1) if contender.gathered else 2 * (w - 1) / w),
                     "buckets": len(contender.opt.engine.buckets)})
        del contender
        gc.collect()  # an optimizer holds reference cycles: free its copies of the model before the next
    mem = PeakMemory(device)  # on CPU this pins glibc's mmap threshold: only after the timings
    for row, (label, spec) in zip(rows, picked):
        contender = floor(label, spec)
        extra = mem.measure(lambda: (contender.setup(), contender.round(), _sync_device(device)))
        row["extra_peak_mb"] = None if extra is None else extra / 2**20
        del contender
        gc.collect()
    return rows


def _print_fake_world_compressors(entry: dict, args: argparse.Namespace) -> None:
    w = args.fake_world
    print(f"\n== TransformerEncoder {entry['layers']}x{entry['width']}: {entry['params'] / 1e6:.1f}M params in "
          f"{entry['tensors']} tensors, buckets of {args.bucket_cap_mb[0]:g} MB; fake world of {w} on "
          f"{entry['device']} ==")
    print(f"compressed rounds' compute floor at W={w}: v, encode, {w} decodes per bucket (rs: {w} shard decodes, "
          f"a requantize and {w} shard decodes), no wire; wire MB per rank and round: ring all-gather (W-1) x "
          f"payload (rs: 2(W-1)/W x payload) vs ring all-reduce of fp32 2(W-1)/W x "
          f"{entry['compressors'][0]['fp32_mb']:.1f} MB")
    print(f"{'compressor':<16} {'floor ms':>9} {'ops':>6} {'payload MB':>11} {'wire MB':>10} {'fp32 ring MB':>13} "
          f"{'extra peak MB':>14}")
    for row in entry["compressors"]:
        mem = "n/a" if row["extra_peak_mb"] is None else f"{row['extra_peak_mb']:.1f}"
        print(f"{row['method']:<16} {row['median_ms']:>9.2f} {row['ops']:>6} {row['payload_mb']:>11.3f} "
              f"{row['wire_mb']:>10.3f} {2 * (w - 1) / w * row['fp32_mb']:>13.3f} {mem:>14}")
    sys.stdout.flush()


def _time_interleaved(methods: dict[str, Callable[[], None]], args: argparse.Namespace,
                      device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each method, interleaved round by round so drift hits every method alike."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    for r in range(args.warmup + args.rounds):
        for name, fn in methods.items():
            _sync_device(device)
            t0 = time.perf_counter()
            fn()
            _sync_device(device)
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def _print_fake_world(entry: dict, args: argparse.Namespace, device: torch.device) -> None:
    print(f"\n== TransformerEncoder {entry['layers']}x{entry['width']}: {entry['params'] / 1e6:.1f}M params in "
          f"{entry['tensors']} tensors, {entry['buckets']} buckets of {args.bucket_cap_mb[0]:g} MB; fake world of "
          f"{args.fake_world} on {device}: no wire, everything else ==")
    print(f"{'method':<42} {'median ms':>10} {'x torch':>8} {'ops':>6} {'CUDA kernels':>13}")
    for row in entry["rounds"]:
        kernels = "n/a" if row["cuda_kernels"] is None else str(row["cuda_kernels"])
        print(f"{row['method']:<42} {row['median_ms']:>10.3f} {row['ratio_to_torch']:>8.3f} {row['ops']:>6} "
              f"{kernels:>13}")
    sys.stdout.flush()


def _print_model(entry: dict, report: dict) -> None:
    print(f"\n== TransformerEncoder {entry['layers']}x{entry['width']}: {entry['params'] / 1e6:.1f}M params "
          f"in {entry['tensors']} tensors, {entry['rounds'][0]['payload_mb']:.1f} MB payload (fp32), "
          f"{report['world_size']} ranks, {report['backend']} on {report['device']} ==")
    print(f"{'method':<40} {'median ms':>10} {'x flat':>8} {'payload MB':>10} {'sent MB':>8} {'extra peak MB':>14}")
    for row in entry["rounds"]:
        mem = "n/a" if row["extra_peak_mb"] is None else f"{row['extra_peak_mb']:.1f}"
        print(f"{row['method']:<40} {row['median_ms']:>10.2f} {row['ratio_to_flat']:>8.3f} "
              f"{row['payload_mb']:>10.3f} {row['wire_mb_per_rank']:>8.3f} {mem:>14}")
    print("payload MB: what each rank hands to the round's collectives; sent MB: what it sends on the wire "
          "(ring all-reduce 2(W-1)/W x, ring all-gather (W-1) x the payload)")
    if "breakdown" in entry:
        b = entry["breakdown"]
        print(f"phases of one round (cap {max(report.get('caps', [0]) or [0]):g} MB, {b['buckets']} buckets): "
              + ", ".join(f"{k} {v:.2f} ms" for k, v in b.items() if k != "buckets"))
    s = entry["step"]
    print(f"non-averaging step(): bare AdamW {s['bare_step_ms']:.2f} ms, wrapped {s['wrapped_step_ms']:.2f} ms, "
          f"ratio {s['ratio']:.4f} ({s['overhead_us']:+.1f} us)")
    sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
