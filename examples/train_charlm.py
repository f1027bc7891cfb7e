"""Train a character-level transformer language model with Local SGD (or DDP) under torchrun.

The default corpus is real text present on every machine with Python: the standard
library's own source files (found through ``sysconfig``), split into train and
held-out validation. ``--data FILE`` trains on any text instead.

    torchrun --nproc-per-node 2 examples/train_charlm.py                      # Local SGD, k=8
    torchrun --nproc-per-node 2 examples/train_charlm.py --method ddp         # the baseline
    torchrun --nproc-per-node 2 examples/train_charlm.py --ckpt-dir ck --ckpt-every 100  # resumable

Checkpoints are per rank (each replica's inner optimizer state is its own), written
atomically; a restarted job (``torchrun --max-restarts``) resumes from the last one
and ends with exactly the parameters of an uninterrupted run.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import inspect
import json
import math
import os
import signal
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from localsgd_optim import Combined, LocalSGDOptimizer, checkpoint, diloco, quantize, topk
from localsgd_optim.elastic import ElasticCheckpoint


def stdlib_text(max_bytes: int) -> bytes:
    """The standard library's .py files, in a fixed order, up to ``max_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return b"".join(chunks)[:max_bytes]


def load_corpus(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    raw = Path(args.data).read_bytes()[: args.max_bytes] if args.data else stdlib_text(args.max_bytes)
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()  # byte-level: vocab 256
    split = int(len(data) * 0.9)
    return data[:split], data[split:]


class CharTransformer(nn.Module):
    def __init__(self, vocab: int, d_model: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.zeros(context, d_model))
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        h = self.embed(idx) + self.pos[:t]
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        # nn.Linear on a 3-D input returns a view of a 2-D matmul. FSDP2 warns when the
        # root returns a view (an in-place op on it would skip its backward hook), so return
        # a fresh tensor with the same values.
        return self.head(self.norm(h)).clone()


def batch(data: torch.Tensor, size: int, context: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, len(data) - context - 1, (size,), generator=g)
    x = torch.stack([data[s:s + context] for s in starts])
    y = torch.stack([data[s + 1:s + 1 + context] for s in starts])
    return x, y


class GlobalWindows:
    """Training windows numbered globally: sample ``i`` is the window at ``(a * i + b) mod M``, a
    permutation of all ``M`` windows (``a`` coprime with ``M``). With ``W`` ranks reading, rank
    ``r`` takes samples ``position + r * B ... + B`` at each step and the position advances by
    ``W * B``: after a resize the new ranks carry on from the same position, so no sample is
    skipped or read twice (``--elastic``)."""

    def __init__(self, data: torch.Tensor, context: int, seed: int) -> None:
        self.data, self.context = data, context
        self.m = len(data) - context - 1
        self.a = next(x for x in range(int(self.m * 0.6180339887) | 1, 2 * self.m) if math.gcd(x, self.m) == 1)
        self.b = (seed * 7919 + 17) % self.m

    def ids(self, first: int, size: int) -> list[int]:
        return list(range(first, first + size))

    def batch(self, first: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = [(self.a * i + self.b) % self.m for i in range(first, first + size)]
        x = torch.stack([self.data[s:s + self.context] for s in starts])
        y = torch.stack([self.data[s + 1:s + 1 + self.context] for s in starts])
        return x, y


@torch.no_grad()
def evaluate(model: nn.Module, val: torch.Tensor, args: argparse.Namespace) -> float:
    """Mean loss over a fixed set of validation windows (identical on every rank)."""
    model.eval()
    g = torch.Generator().manual_seed(12345)
    losses = []
    for _ in range(args.eval_batches):
        x, y = batch(val, args.batch_size, args.context, g)
        logits = model(x)
        losses.append(nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).item())
    model.train()
    return sum(losses) / len(losses)


def wrap_ddp(module: nn.Module) -> nn.Module:
    """DDP without per-forward buffer sync, which Local SGD does not want (the causal mask is a buffer)."""
    ddp = nn.parallel.DistributedDataParallel
    key = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters else "broadcast_buffers"
    return ddp(module, **{key: False})


def shard_replicas(net: nn.Module, shards: int, world: int) -> Any:
    """FSDP2 inside each replica: ``world // shards`` replicas of ``shards`` ranks; returns the mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world // shards, shards), mesh_dim_names=("replicate", "shard"))
    for layer in net.blocks.layers:
        fully_shard(layer, mesh=mesh["shard"])
    fully_shard(net, mesh=mesh["shard"])
    return mesh


def tensor_parallel_replicas(net: nn.Module, tp: int, world: int) -> Any:
    """Tensor parallelism inside each replica: every block's feed-forward split over ``tp`` ranks
    (``linear1`` by columns, ``linear2`` by rows); attention, norms and embeddings replicated."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (world // tp, tp), mesh_dim_names=("replicate", "tp"))
    for layer in net.blocks.layers:
        parallelize_module(layer, mesh["tp"], {"linear1": ColwiseParallel(), "linear2": RowwiseParallel()})
    return mesh


def reshard(model: nn.Module) -> None:
    """FSDP2: register the sharded parameters again (an eval forward leaves the root unsharded)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@torch.no_grad()
def evaluate_average(model: nn.Module, opt: torch.optim.Optimizer, val: torch.Tensor,
                     args: argparse.Namespace) -> float:
    """Validation loss of the averaged model, leaving every rank's local replica untouched."""
    if not isinstance(opt, LocalSGDOptimizer):
        return evaluate(model, val, args)  # DDP: replicas are always identical
    local = [p.detach().clone() for p in model.parameters()]
    opt.sync()
    loss = evaluate(model, val, args)
    reshard(model)  # (sharded) the restore below must reach the shards the next forward gathers
    for p, saved in zip(model.parameters(), local):
        p.copy_(saved)
    return loss


def speeds_arg(text: str) -> list[float]:
    try:
        speeds = [float(x) for x in text.split(",")]
    except ValueError:
        speeds = []
    if not speeds or not all(math.isfinite(x) and x >= 1 for x in speeds):
        raise argparse.ArgumentTypeError(f"--speeds takes slowdowns >= 1 separated by commas (one per rank), "
                                         f"e.g. 1,1,1,2; got {text!r}")
    return speeds


def compression_arg(text: str) -> str:
    """Check a ``--compression`` value early: a name, or ``topk:FRACTION[:BITS]``."""
    if text in ("bf16", "int8", "int4", "int2", "int8-rs", "int4-rs", "int2-rs"):
        return text
    parts = text.split(":")
    try:
        if parts[0] != "topk" or not 2 <= len(parts) <= 3:
            raise ValueError
        topk(float(parts[1]), bits=int(parts[2]) if len(parts) == 3 else None)
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected bf16, int8, int4, int2, int8-rs, int4-rs, int2-rs (-rs: a reduce-scatter of the "
            "codes) or topk:FRACTION[:BITS] (e.g. topk:0.01:2)"
            + (f" ({e})" if str(e) else "")) from None
    return text


def compression_of(args: argparse.Namespace) -> Any:
    """``--compression`` and ``--chunk`` as the wrapper's ``compression`` argument."""
    text = args.compression
    if text in ("int4", "int2"):
        return quantize(int(text[3:]), chunk=args.chunk)
    if text is not None and text.endswith("-rs"):  # dense codes through a reduce-scatter (ZeRO++'s qgZ)
        return quantize(int(text[3:-3]), chunk=args.chunk, collective="reduce_scatter")
    if text is not None and text.startswith("topk:"):
        parts = text.split(":")
        return topk(float(parts[1]), bits=int(parts[2]) if len(parts) == 3 else None, chunk=args.chunk)
    return text


def inner_optimizer(net: nn.Module, model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW, or Muon for the transformer blocks' matrices and AdamW for the rest (embeddings, head,
    norms, biases), combined into one optimizer; Muon's lr scaled to match AdamW's update size."""
    adamw = lambda params: torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)  # noqa: E731
    if args.inner == "adamw":
        return adamw(model.parameters())
    matrices = {id(p) for p in net.blocks.parameters() if p.ndim == 2}
    return Combined(
        torch.optim.Muon([p for p in model.parameters() if id(p) in matrices], lr=args.lr, weight_decay=0.01,
                         adjust_lr_fn="match_rms_adamw"),
        adamw([p for p in model.parameters() if id(p) not in matrices]))


def communication_summary(opt: torch.optim.Optimizer, eval_cost: dict, steps: int, n_params: int,
                          train_s: float, world: int) -> dict | None:
    """Rounds, MB this rank sent against what DDP's gradient all-reduce would have sent, time in rounds."""
    if world == 1 or steps == 0:
        return None
    ddp_mb = steps * n_params * 4 / 2**20  # DDP hands every gradient (fp32) to an all-reduce every step
    if not isinstance(opt, LocalSGDOptimizer):
        return {"rounds": steps, "mb_sent": ddp_mb, "ddp_mb": ddp_mb, "round_share": None,
                "line": f"communication: {steps} gradient all-reduces, {ddp_mb:.1f} MB sent per rank "
                        "(overlapped with backward)"}
    s = {key: value - eval_cost[key] for key, value in opt.stats().items()}
    mb = s["bytes_sent"] / 2**20
    share = s["round_seconds"] / train_s if train_s else float("nan")
    return {"rounds": s["rounds"], "mb_sent": mb, "ddp_mb": ddp_mb, "round_share": share,
            "mb_per_round": mb / s["rounds"] if s["rounds"] else 0.0,
            "line": f"communication: {s['rounds']} rounds, {mb:.1f} MB sent per rank against {ddp_mb:.1f} MB "
                    f"for DDP ({mb / ddp_mb:.1%}), {share:.1%} of training time in rounds "
                    "(evaluation syncs excluded)"}


def checkpoint_summary(stalls: list[float], comm: dict | None, train_s: float, steps: int,
                       every: int) -> dict | None:
    """How long training waited for --elastic's checkpoints, against a round and a period."""
    if not stalls or not train_s or not steps:
        return None
    stall = sorted(stalls)[len(stalls) // 2]
    rounds = comm["rounds"] if comm else 0
    round_s = comm["round_share"] * train_s / rounds if comm and rounds and comm["round_share"] == comm["round_share"] \
        else float("nan")
    period_s = train_s * every / steps if steps else float("nan")
    return {"saves": len(stalls), "stall_ms": 1e3 * stall, "round_ms": 1e3 * round_s, "period_ms": 1e3 * period_s,
            "line": f"checkpoints: {len(stalls)} asynchronous saves, training waited {1e3 * stall:.1f} ms each "
                    f"(median): {stall / period_s:.1%} of the {every} steps between saves "
                    f"({1e3 * period_s:.0f} ms), {stall / round_s:.0%} of an averaging round ({1e3 * round_s:.1f} ms)"}


def save_checkpoint(path: Path, step: int, model: nn.Module, opt: torch.optim.Optimizer,
                    sched: torch.optim.lr_scheduler.LRScheduler, g: torch.Generator, world: int,
                    sharded: bool = False) -> None:
    tmp = path.with_suffix(".tmp")
    # sharded: this rank's local shards, keyed by parameter name (checkpoint.rank_state)
    train = {"train": checkpoint.rank_state(model, opt)} if sharded else \
        {"model": model.state_dict(), "opt": opt.state_dict()}
    torch.save({"step": step, **train, "sched": sched.state_dict(), "data_rng": g.get_state(),
                "world_size": world}, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-write never leaves a torn checkpoint


def load_checkpoint(ckpt_dir: Path, rank: int, world: int, shards: int = 1) -> tuple[dict | None, int]:
    """This rank's own checkpoint; or, when a different number of ranks saved them (a host gone
    for good, or added), the saved ranks holding this rank's shard consolidated: loads at any
    number of replicas."""
    first = ckpt_dir / "rank0.pt"
    if not first.exists():
        return None, world
    return checkpoint.load_per_rank(lambda r: ckpt_dir / f"rank{r}.pt", rank, world, shards)


def log_samples(directory: str, attempt: int, rank: int, step: int, ids: list[int]) -> None:
    """One line per step: the attempt (rank 0's start time, shared by the ranks of one attempt), the
    step and the sample numbers this rank trained on."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    with open(Path(directory) / f"rank{rank}-{attempt}.txt", "a") as f:
        f.write(f"{attempt} {step} {' '.join(map(str, ids))}\n")


def fail_once(marker: Path, step: int) -> None:
    """Fault injection for testing restarts: die by SIGKILL, unless a previous run already did."""
    if marker.exists():
        return
    marker.write_text(f"killed at step {step}\n")  # first, so the restarted run does not die again
    print(f"--fail-at-step: killing this rank (pid {os.getpid()}) with SIGKILL at step {step}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


class lr_factor:
    """Linear warmup over 5% of the steps, then cosine decay to 10% (picklable, unlike a lambda)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.cosine, self.total = args.lr_schedule == "cosine", args.steps
        self.warmup = max(1, self.total // 20)

    def __call__(self, step: int) -> float:
        if not self.cosine:
            return 1.0
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def ft_manager(args: argparse.Namespace, under_torchrun: bool) -> tuple[Any, int]:
    """torchft's Manager for this replica group (``REPLICA_GROUP_ID``; lighthouse ``TORCHFT_LIGHTHOUSE``).

    Under torchrun the group's world and store are torchrun's; alone, this process makes its own.
    """
    from torchft import Manager, ProcessGroupGloo

    group = int(os.environ["REPLICA_GROUP_ID"])
    store = {}
    if not under_torchrun:  # its own world of one, on a store of its own
        tcp = dist.TCPStore("127.0.0.1", 0, 1, True)
        dist.init_process_group("gloo", store=tcp, rank=0, world_size=1)
        store = {"store_addr": "127.0.0.1", "store_port": tcp.port, "rank": 0, "world_size": 1}
    if dist.get_world_size() != 1:
        raise SystemExit(f"--ft runs one process per replica group, got {dist.get_world_size()} in this one")
    timeout = datetime.timedelta(seconds=args.pg_timeout or 30)
    pg = ProcessGroupGloo(timeout=timeout)
    manager = Manager(pg=pg, load_state_dict=None, state_dict=None, min_replica_size=args.ft_min_replicas,
                      use_async_quorum=False, replica_id=f"charlm{group}", timeout=timeout, **store)
    pg.register("torchft")
    return manager, group


def ft_summary(net: nn.Module, opt: LocalSGDOptimizer, manager: Any, group: int, samples: int) -> dict[str, Any]:
    """--ft: what the JSON says about this replica group (and a line to print)."""
    digest = hashlib.sha256()
    for p in net.parameters():  # the final parameters' bytes, in order: equal on every replica at the end
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    managed = opt.managed
    out = {"replica_group": group, "param_digest": digest.hexdigest(), "rounds_committed": managed.rounds_committed,
           "rounds_rolled_back": managed.rounds_rolled_back, "heals": managed.heals,
           "torchft_step": manager.current_step(), "samples_trained": samples,
           "lr": opt.param_groups[0]["lr"]}  # (a heal brings the LR schedule's position too)
    out["line"] = (f"{managed.rounds_committed} rounds committed, {managed.rounds_rolled_back} undone, "
                   f"{len(managed.heals)} heal(s), {samples} samples, params sha256 {out['param_digest'][:16]}")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=["localsgd", "diloco", "ddp", "none"], default="localsgd",
                   help="none: compute only, no communication at all (replicas drift apart; the "
                        "physical speed limit for benchmarks, not a training method)")
    p.add_argument("--outer-lr", type=float, default=0.7, help="diloco: outer Nesterov SGD learning rate")
    p.add_argument("--outer-momentum", type=float, default=0.9, help="diloco: outer momentum")
    p.add_argument("--compression", type=compression_arg, default=None, metavar="C",
                   help="compress the pseudo-gradients: bf16, int8, int4, int2, int8-rs, int4-rs, int2-rs "
                        "(-rs: reduce-scatter of the codes, from about 4 replicas), or topk:FRACTION[:BITS] "
                        "(e.g. topk:0.01:2, SparseLoCo's setting), each with error feedback but bf16")
    p.add_argument("--chunk", type=int, default=4096, help="elements per chunk of int4/int2/topk")
    p.add_argument("--inner", choices=["adamw", "muon"], default="adamw",
                   help="inner optimizer; muon: Muon for the blocks' matrices, AdamW for the rest, as one")
    p.add_argument("--overlap-steps", type=int, default=0,
                   help="Streaming DiLoCo: reduce in the background for N more local steps, then apply; with "
                        "--round-every-s, rounds launch without waiting for the other replicas")
    p.add_argument("--k", type=int, default=8, help="steps between averaging rounds (localsgd)")
    p.add_argument("--fragments", type=int, default=1,
                   help="Streaming DiLoCo: sync the model in this many fragments at staggered steps")
    p.add_argument("--extrapolate", type=float, default=None, metavar="LR",
                   help="localsgd: an outer SGD step of LR on the averaged pseudo-gradient (1.0: plain "
                        "averaging; > 1 extrapolates past the average, lookahead-like)")
    p.add_argument("--average-optimizer-state", action="store_true",
                   help="also average AdamW's moments at every round (3x the bytes of a round)")
    p.add_argument("--warmup-steps", type=int, default=0,
                   help="post-local SGD: synchronous steps (DDP gradient all-reduce) before Local SGD")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--lr-schedule", choices=["cosine", "constant"], default="cosine",
                   help="cosine: linear warmup over 5%% of --steps, then cosine decay to 10%% of --lr")
    p.add_argument("--batch-size", type=int, default=16, help="per rank")
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--data", type=str, default=None, help="a text file (default: the stdlib sources)")
    p.add_argument("--max-bytes", type=int, default=4_000_000)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--ckpt-dir", type=str, default=None, help="per-rank checkpoints; resumes if present")
    p.add_argument("--ckpt-every", type=int, default=0)
    p.add_argument("--elastic", action="store_true",
                   help="hosts may come and go (torchrun --nnodes MIN:MAX): asynchronous, atomic checkpoints in "
                        "--ckpt-dir after every round (or every --ckpt-every steps), resumed at any world size, and "
                        "a global sample position that a resize carries on from")
    p.add_argument("--sample-log", type=str, default=None, metavar="DIR",
                   help="--elastic: each rank appends the sample numbers it trains on to DIR (for counting)")
    p.add_argument("--fail-in-save-at-step", type=int, default=0, metavar="N",
                   help="--elastic fault injection: the last rank dies by SIGKILL while writing step N's checkpoint "
                        "(after its temporary file, before the rename), once (marker <ckpt-dir>/failed-once)")
    p.add_argument("--step-delay", type=float, default=0.0, metavar="S",
                   help="sleep S seconds after every step (fault-injection tests: a slower model)")
    p.add_argument("--speeds", type=speeds_arg, default=None, metavar="S0,S1,...",
                   help="a slowdown per rank, e.g. 1,1,1,2: rank r sleeps S_r x --step-delay after each step "
                        "instead of --step-delay (the compute itself is not scaled: a sleep proportional to a "
                        "step's measured time would also scale the time it waits for the others)")
    p.add_argument("--round-every-s", type=float, default=None, metavar="T",
                   help="time-budgeted rounds (localsgd, diloco): each replica steps until T seconds have passed "
                        "since the last round, instead of --k steps; the run is --rounds rounds long, the LR "
                        "schedule follows the rounds, and --eval-every counts rounds")
    p.add_argument("--rounds", type=int, default=None, metavar="R",
                   help="with --round-every-s: rounds to train (default: --steps / --k)")
    p.add_argument("--weight", choices=["none", "tokens", "steps"], default="none",
                   help="weight each replica's share of a round by the tokens (or steps) it trained since the "
                        "last one (step(tokens=)); the same for both at a fixed batch size")
    p.add_argument("--pg-timeout", type=float, default=None, metavar="S",
                   help="the process group's timeout in seconds: how long a round waits for a hung rank")
    p.add_argument("--fail-at-step", type=int, default=0, metavar="N",
                   help="for testing the restart recipe: the last rank (--ft: the last replica group) kills itself "
                        "with SIGKILL at step N, "
                        "once, if a marker file <ckpt-dir>/failed-once does not exist yet; it creates the "
                        "marker first (needs --ckpt-dir)")
    p.add_argument("--stop-at-step", type=int, default=0, metavar="N",
                   help="end the run after step N, as if interrupted (the LR schedule stays --steps long)")
    p.add_argument("--shard", type=int, default=1, metavar="S",
                   help="shard each replica over S ranks with FSDP2 (world = replicas x S); Local SGD averages "
                        "each shard across the replicas")
    p.add_argument("--tp", type=int, default=1, metavar="S",
                   help="tensor-parallel replicas: each block's feed-forward split over S ranks (the S ranks of a "
                        "replica read the same batches); Local SGD averages each shard across the replicas")
    p.add_argument("--ft", action="store_true",
                   help="live membership through torchft: this process is replica group $REPLICA_GROUP_ID of a job whose "
                        "lighthouse is $TORCHFT_LIGHTHOUSE; survivors train through failures, a returning group heals "
                        "from a peer (one process per replica group, under torchrun or alone)")
    p.add_argument("--ft-groups", type=int, default=2, metavar="G",
                   help="--ft: replica group slots (REPLICA_GROUP_ID < G): at step s, group r reads samples "
                        "((s-1)*G + r)*B onward")
    p.add_argument("--ft-min-replicas", type=int, default=1, metavar="N",
                   help="--ft: the fewest replica groups a round may commit with")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", type=str, default=None, help="write the loss curve here (rank 0)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank")
    args = p.parse_args(argv)
    if args.steps < 1 or args.k < 1:
        p.error(f"--steps and --k must be >= 1, got --steps {args.steps} --k {args.k}")
    for flag, value in (("--shard", args.shard), ("--tp", args.tp)):
        if value < 1 or (value > 1 and args.method not in ("localsgd", "diloco")):
            p.error(f"{flag} {value}: must be >= 1, and > 1 only with --method localsgd or diloco")
    if args.shard > 1 and args.tp > 1:
        p.error("--shard and --tp: pick one way to split a replica")
    if args.elastic and not args.ckpt_dir:
        p.error("--elastic needs --ckpt-dir (where the checkpoints a restart resumes from live)")
    if args.elastic and args.method not in ("localsgd", "diloco"):
        p.error("--elastic works with --method localsgd or diloco")
    if args.ft and (args.method not in ("localsgd", "diloco") or args.elastic or args.shard > 1 or args.tp > 1
                    or args.warmup_steps or args.overlap_steps):
        p.error("--ft works with --method localsgd or diloco, without --elastic, --shard, --tp, --warmup-steps or "
                "--overlap-steps (one process per replica group)")
    if args.ft and not 0 <= int(os.environ.get("REPLICA_GROUP_ID", -1)) < args.ft_groups:
        p.error(f"--ft needs REPLICA_GROUP_ID in 0..{args.ft_groups - 1} (--ft-groups), got "
                f"{os.environ.get('REPLICA_GROUP_ID')!r}, and TORCHFT_LIGHTHOUSE=http://host:port")
    if args.round_every_s is not None and (args.method not in ("localsgd", "diloco") or args.ft or args.elastic
                                           or args.ckpt_dir or args.stop_at_step):
        p.error("--round-every-s works with --method localsgd or diloco, without --ft, --elastic, --ckpt-dir "
                "or --stop-at-step (replicas' step counts differ)")
    if args.weight != "none" and args.method not in ("localsgd", "diloco"):
        p.error(f"--weight {args.weight} weights the rounds of --method localsgd or diloco, not {args.method}")
    if args.speeds is not None and (not args.step_delay or args.shard > 1 or args.tp > 1):
        p.error("--speeds scales --step-delay per rank: it needs --step-delay > 0, and a replica of one rank "
                "(not with --shard or --tp)")
    if args.round_every_s is not None and not (math.isfinite(args.round_every_s) and args.round_every_s > 0):
        p.error(f"--round-every-s must be a number of seconds > 0, got {args.round_every_s}")
    if args.round_every_s is None and args.rounds is not None:
        p.error("--rounds goes with --round-every-s (without it, --steps says how long to train)")
    if args.round_every_s is not None and args.rounds is None:
        args.rounds = max(1, args.steps // args.k)
    if args.rounds is not None and args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.fail_at_step and not args.ckpt_dir:
        p.error(f"--fail-at-step {args.fail_at_step} needs --ckpt-dir (its marker file lives there)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        timeout = {"timeout": datetime.timedelta(seconds=args.pg_timeout)} if args.pg_timeout else {}
        dist.init_process_group("gloo", **timeout)
    manager = group = None
    if args.ft:  # this process is one replica group; the replica groups meet in torchft's quorum
        manager, group = ft_manager(args, distributed)
        distributed = False  # (its own world of one: the rounds run on the manager's process group)
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1

    train, val = load_corpus(args)
    torch.manual_seed(args.seed)  # same initial model on every rank
    net = CharTransformer(256, args.d_model, args.layers, args.heads, args.context)
    n_params = sum(p.numel() for p in net.parameters())
    mesh = None
    split = max(args.shard, args.tp)  # ranks per replica
    if split > 1:
        if world % split:
            raise SystemExit(f"--shard/--tp {split} needs a world size divisible by it, got {world} rank(s)")
        mesh = shard_replicas(net, split, world) if args.shard > 1 else tensor_parallel_replicas(net, split, world)
        model = net
    else:
        model = wrap_ddp(net) if distributed and args.method != "none" else net
    inner = inner_optimizer(net, model, args)
    if args.method in ("ddp", "none"):
        opt = inner
    else:
        outer = diloco(args.outer_lr, args.outer_momentum) if args.method == "diloco" else None
        if args.extrapolate is not None:  # plain averaging, then a step past the average (no momentum)
            outer = lambda params: torch.optim.SGD(params, lr=args.extrapolate)  # noqa: E731
        when = {"round_every_s": args.round_every_s} if args.round_every_s is not None else {"k": args.k}
        opt = LocalSGDOptimizer(inner, **when, warmup_steps=args.warmup_steps, outer_optimizer=outer,
                                process_group=mesh["replicate"] if mesh is not None else None,
                                compression=compression_of(args), overlap_steps=args.overlap_steps,
                                average_optimizer_state=args.average_optimizer_state, fragments=args.fragments,
                                manager=manager)
    # LR schedulers step the wrapper like any optimizer (param_groups are shared with the inner one)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(args))
    timed = args.round_every_s is not None  # replicas' step counts differ: the schedule follows the rounds
    if args.speeds is not None and len(args.speeds) != world:
        raise SystemExit(f"--speeds gives {len(args.speeds)} slowdown(s) for {world} rank(s): give one per rank")
    speed = args.speeds[rank] if args.speeds is not None else 1.0
    tokens = {"none": None, "tokens": args.batch_size * args.context, "steps": 1}[args.weight]
    # each rank its own data stream; tensor parallelism: each replica its own, read by all its ranks
    stream = rank // args.tp if args.tp > 1 else rank
    g = torch.Generator().manual_seed(args.seed * 1000 + stream)

    start = 0
    if manager is not None:  # a heal brings the schedule too; the data position follows the step count
        manager.register_state_dict_fn("lr_schedule", sched.load_state_dict, sched.state_dict)
        readers, reader = args.ft_groups, group
        windows = GlobalWindows(train, args.context, args.seed)
        start = opt.managed.start()
        healed_in_step = bool(opt.managed.heals) and opt.managed.heals[-1]["in_step"]
        if healed_in_step:  # the donor was inside its step()'s round: finish that step as the donor does
            sched.step()
        if start:
            print(f"replica group {group}: healed from {opt.managed.heals[-1]['from']} at step {start}", flush=True)
    ckpt = Path(args.ckpt_dir) / f"rank{rank}.pt" if args.ckpt_dir and not args.elastic and not args.ft else None
    elastic = None
    if manager is None:
        windows = None
        readers, reader = world // args.tp, rank // args.tp  # data-parallel readers (TP ranks share a batch)
    position = 0  # --elastic: global samples consumed so far
    if args.elastic:
        elastic = ElasticCheckpoint(args.ckpt_dir, shards=split)
        windows = GlobalWindows(train, args.context, args.seed)
        resumed = elastic.resume(net, opt)
        if resumed is not None:
            start, position = resumed.step, resumed.extra["position"]
            sched.load_state_dict(resumed.extra["sched"])
            if rank == 0:
                print(resumed.message, flush=True)
    if ckpt is not None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        state, saved_world = load_checkpoint(Path(args.ckpt_dir), rank, world, split)
        if state is not None:
            if mesh is not None:
                checkpoint.load_rank_state(net, opt, state["train"])
            else:
                net.load_state_dict(state["model"])
                opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            start = state["step"]
            if saved_world == world:
                g.set_state(state["data_rng"])
            else:  # a new world: each rank a fresh data stream of its own
                g.manual_seed(args.seed * 1000 + stream + 7919 * start)
            if rank == 0:
                how = "" if saved_world == world else f" (saved by {saved_world} ranks: their average)"
                print(f"resumed from {ckpt.parent} at step {start}{how}", flush=True)
        if distributed:
            dist.barrier()  # every rank has read the checkpoints before any rank overwrites its own

    if rank == 0:
        how = "FSDP2 shards" if args.shard > 1 else "tensor-parallel ranks"
        shape = f" as {world // split} replicas x {split} {how}" if mesh is not None else ""
        shape = f", replica group {group} of up to {args.ft_groups} (torchft)" if manager is not None else shape
        print(f"{args.method}: {n_params / 1e6:.2f}M parameters, {world} rank(s){shape}, "
              f"{len(train) / 1e6:.1f}M train / {len(val) / 1e6:.2f}M val bytes", flush=True)
    history = []
    eval_cost = {"rounds": 0, "bytes_sent": 0, "round_seconds": 0.0}
    # opt.no_sync keeps DDP's gradient all-reduce on for --warmup-steps, then turns it off
    sync_ctx = opt.no_sync(model) if isinstance(opt, LocalSGDOptimizer) else _nullcontext()
    attempt = 0
    if args.sample_log:  # one token per attempt, the same on every rank: rank 0's start time
        token = [time.time_ns()]
        if distributed:
            dist.broadcast_object_list(token, src=0)
        attempt = token[0]
    train_s, t0 = 0.0, time.perf_counter()  # the clock excludes validation
    samples = 0
    step = start
    with sync_ctx:
        while (opt.num_rounds < args.rounds) if timed else (step < args.steps):
            step += 1
            if timed:  # the LR of the fraction of the run done: rounds, and the time into this period
                progress = (opt.num_rounds + min(1.0, opt.period_spent_s / args.round_every_s)) / args.rounds
                for group_ in opt.param_groups:
                    group_["lr"] = args.lr * lr_factor(args)(int(progress * args.steps))

            if manager is not None:  # --ft: group r reads samples (step - 1) * G * B + r * B onward
                position = (step - 1) * readers * args.batch_size
            if windows is not None:
                first = position + reader * args.batch_size
                x, y = windows.batch(first, args.batch_size)
                if args.sample_log:
                    log_samples(args.sample_log, attempt, group if args.ft else rank, step,
                                windows.ids(first, args.batch_size))
                position += readers * args.batch_size
            else:
                x, y = batch(train, args.batch_size, args.context, g)
            loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
            loss.backward()
            rounds = opt.num_rounds if timed else 0
            if tokens is None:
                opt.step()
            else:
                opt.step(tokens=tokens)
            if not timed:
                sched.step()
            opt.zero_grad()
            samples += args.batch_size

            if manager is not None and opt.num_steps != step:  # healed inside a round: the donor's step count
                step = opt.num_steps
            if args.step_delay:
                time.sleep(speed * args.step_delay)
            if ckpt is not None and args.ckpt_every and step % args.ckpt_every == 0:
                save_checkpoint(ckpt, step, net, opt, sched, g, world, sharded=mesh is not None)
            if elastic is not None and step == args.fail_in_save_at_step and rank == world - 1:
                elastic._fault = lambda point: (fail_once(Path(args.ckpt_dir) / "failed-once", step)
                                                if point == "after_tmp" else None)
            if elastic is not None and step % (args.ckpt_every or args.k) == 0:  # right after a round
                elastic.save(step, net, opt, extra={"position": position, "sched": sched.state_dict()})
            if step == args.fail_at_step and (group == args.ft_groups - 1 if args.ft else rank == world - 1):
                fail_once(Path(args.ckpt_dir) / "failed-once", step)
            if step == args.stop_at_step:
                break
            if timed and opt.num_rounds > rounds and (opt.num_rounds % args.eval_every == 0
                                                      or opt.num_rounds == args.rounds):
                train_s += time.perf_counter() - t0  # right after a round: every replica evaluates here
                with opt.paused():  # (the period's clock stands still)
                    if opt.num_rounds == args.rounds:
                        opt.land()  # --overlap-steps: the last round, launched just now, ends the run
                    before = opt.stats()
                    val_loss = evaluate_average(net, opt, val, args)
                    for key, value in opt.stats().items():
                        eval_cost[key] += value - before[key]
                history.append({"round": opt.num_rounds, "step": step, "train_loss": loss.item(),
                                "val_loss": val_loss, "time_s": train_s})
                if rank == 0:
                    print(f"round {opt.num_rounds:4d}/{args.rounds}  step {step:5d}  train {loss.item():.3f}  "
                          f"val {val_loss:.3f}  ({train_s:.1f} s)", flush=True)
                t0 = time.perf_counter()
            elif not timed and (step % args.eval_every == 0 or step == args.steps):
                train_loss = loss.item()
                train_s += time.perf_counter() - t0
                before = opt.stats() if isinstance(opt, LocalSGDOptimizer) else None
                if manager is not None:  # every replica evaluates its own; the last step ends with a round
                    if step == args.steps:
                        opt.sync()  # (it ends with a round: every replica leaves with the same parameters)
                    val_loss = evaluate(net, val, args)
                else:
                    val_loss = evaluate_average(net, opt, val, args)
                if before is not None:  # the evaluation's sync() is not training traffic
                    for key, value in opt.stats().items():
                        eval_cost[key] += value - before[key]
                history.append({"step": step, "train_loss": train_loss, "val_loss": val_loss, "time_s": train_s})
                if rank == 0:
                    bar = "#" * int(30 * step / args.steps)
                    rate = (step - start) * (world // args.tp) * args.batch_size / max(train_s, 1e-9)
                    print(f"[{bar:<30}] step {step:5d}/{args.steps}  train {train_loss:.3f}  "
                          f"val {val_loss:.3f}  ({rate:.0f} seq/s)", flush=True)
                t0 = time.perf_counter()
    ft = None
    if manager is not None:
        if start == args.steps:  # healed into the last round (start() joined it): nothing left to train
            if healed_in_step:  # (the last scheduled round: the donor's final sync() follows)
                opt.sync()
            history.append({"step": args.steps, "train_loss": math.nan, "val_loss": evaluate(net, val, args),
                            "time_s": train_s})
        ft = ft_summary(net, opt, manager, group, samples)
        print(f"replica group {group}: {ft['line']}", flush=True)
    steps_run = args.steps - start
    steps_per_rank = None
    if timed:  # every replica its own step count: their sum is the work done
        steps_per_rank = [step] * world
        if distributed:
            dist.all_gather_object(steps_per_rank, step)
        steps_run = round(sum(steps_per_rank) / world)
    comm = communication_summary(opt, eval_cost, steps_run, n_params, train_s, world)
    if rank == 0 and comm is not None:
        print(comm.pop("line"), flush=True)
    saving = None
    replicas_identical = None
    if elastic is not None and distributed and steps_run > 0 and mesh is None:  # do the replicas agree at the end?
        digest = torch.stack([p.detach().double().sum() for p in net.parameters()]).cpu()
        everyone = [torch.empty_like(digest) for _ in range(world)]
        dist.all_gather(everyone, digest)
        replicas_identical = all(torch.equal(everyone[0], d) for d in everyone)
    if elastic is not None:
        elastic.close()  # the last write finishes before the process ends
        saving = checkpoint_summary(elastic.stalls, comm, train_s, steps_run, args.ckpt_every or args.k)
        if rank == 0 and saving is not None:
            print(saving.pop("line"), flush=True)
    result = {"communication": comm, "method": args.method, "k": args.k, "world_size": world, "params": n_params,
              "batch_size": args.batch_size, "context": args.context, "steps": steps_run,
              "train_time_s": train_s,
              "samples_per_s": steps_run * (world // args.tp) * args.batch_size / train_s if train_s else math.nan,
              "final_val_loss": history[-1]["val_loss"] if history else math.nan, "history": history,
              "checkpoints": saving, "position": position if args.elastic else None,
              "replicas_identical": replicas_identical, "steps_per_rank": steps_per_rank,
              "rounds": opt.num_rounds if isinstance(opt, LocalSGDOptimizer) else None,
              "speeds": args.speeds, "round_every_s": args.round_every_s, "weight": args.weight, **(ft or {})}
    if rank == 0 and args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))
    if manager is not None:
        manager.shutdown(wait=False)
    return result


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


if __name__ == "__main__":
    main(sys.argv[1:])
    # torch 2.13's gloo can abort at exit if a DDP module outlives the process group:
    # main()'s objects are gone now; collect cycles, then tear down.
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()
