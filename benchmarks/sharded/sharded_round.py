"""A round on an FSDP2-sharded model: ours (zero-copy, and the staged fallback) against torchft-style.

    torchrun --nproc-per-node 4 benchmarks/sharded/sharded_round.py --model 8x256 --rounds 20

Ranks form a (replicate, shard) mesh; every ``TransformerEncoderLayer`` and the root are
``fully_shard``-ed over ``mesh["shard"]``; each method averages the local shards over
``mesh["replicate"]``. Methods run interleaved, round by round, so drift hits them alike; a
round's time is the slowest rank's, and the table gives each one's median and its ratio to ours.

- ``ours (zero-copy)``: ``LocalSGDOptimizer.sync()``: the shards live in one flat buffer per
  dtype (FSDP all-gathers from it), one all-reduce per bucket, one divide, no copy.
- ``ours (zero-copy, check_finite=False)``: the same without the NaN scan (one ``sum`` per buffer).
- ``ours (staged fallback)``: the same with FSDP's private attributes declared unusable: each
  shard is copied into a slot and back (``_sharded.FALLBACK_REASON``).
- ``torchft-style``: per parameter, ``p.to_local()`` cloned into a buffer, an async all-reduce
  each, then a divide and a copy back per parameter (torchft's LocalSGD averages
  ``to_local()`` tensors one collective per parameter and copies them back).
- ``flat limit``: one all-reduce of one pre-allocated buffer of the same bytes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from localsgd_optim import LocalSGDOptimizer, _sharded
from localsgd_optim.bench import build_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="8x256", help="LAYERSxWIDTH")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world // args.shards, args.shards), mesh_dim_names=("replicate", "shard"))
    group = mesh.get_group("replicate")
    layers, width = map(int, args.model.split("x"))

    def sharded_model() -> torch.nn.Module:
        torch.manual_seed(0)
        model = build_model(layers, width)
        for layer in model.layers:
            fully_shard(layer, mesh=mesh["shard"])
        fully_shard(model, mesh=mesh["shard"])
        return model

    model = sharded_model()
    params = list(model.parameters())
    opt = LocalSGDOptimizer(torch.optim.SGD(params, lr=0.0), k=1 << 30, process_group=group)
    bare_model = sharded_model()
    bare = LocalSGDOptimizer(torch.optim.SGD(bare_model.parameters(), lr=0.0), k=1 << 30, process_group=group,
                             check_finite=False)
    _sharded.FALLBACK_REASON = "benchmark: the staged copy path"
    try:
        staged_model = sharded_model()
        staged = LocalSGDOptimizer(torch.optim.SGD(staged_model.parameters(), lr=0.0), k=1 << 30, process_group=group)
    finally:
        _sharded.FALLBACK_REASON = None
    ft_model = sharded_model()
    with torch.no_grad():
        ft_locals = [q.to_local() for q in ft_model.parameters()]
    replicas = dist.get_world_size(group)

    @torch.no_grad()
    def torchft_style() -> None:
        bufs = [t.clone() for t in ft_locals]
        works = [dist.all_reduce(b, group=group, async_op=True) for b in bufs]
        for w in works:
            w.wait()
        for t, b in zip(ft_locals, bufs):
            t.copy_(b.div_(replicas))

    numel = sum(t.numel() for t in opt.engine.tensors)
    flat = torch.zeros(numel)

    def flat_limit() -> None:
        dist.all_reduce(flat, group=group)

    methods = {"flat limit": flat_limit, "ours (zero-copy)": opt.sync,
               "ours (zero-copy, check_finite=False)": bare.sync, "ours (staged fallback)": staged.sync,
               "torchft-style to_local + copy per parameter": torchft_style}
    times: dict[str, list[float]] = {name: [] for name in methods}
    for r in range(args.warmup + args.rounds):
        for name, fn in methods.items():
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank's
            if r >= args.warmup:
                times[name].append(elapsed.item())
    # what only a sharded model adds to a round's Python: reading the local shards, resharding FSDP2
    members = opt._members
    t0 = time.perf_counter()
    for _ in range(100):
        members.params()
        members.before_round()
    sharded_python_ms = (time.perf_counter() - t0) * 10
    if dist.get_rank() == 0:
        ours = statistics.median(times["ours (zero-copy)"])
        print(f"== {args.model}: {len(params)} parameter tensors, {len(model.layers) + 1} FSDP groups, "
              f"{numel * 4 / 2**20:.1f} MB of local shards per rank; {world // args.shards} replicas x "
              f"{args.shards} shards, gloo, {args.rounds} rounds ==")
        print(f"{'method':48s} {'median ms':>10s} {'vs ours':>8s}")
        for name, ts in times.items():
            m = statistics.median(ts)
            print(f"{name:48s} {m * 1e3:10.2f} {m / ours:8.2f}x")
        print(f"sharded-only Python per round (local shards read, FSDP2 modules resharded): {sharded_python_ms:.3f} ms")
        print(f"buckets {len(opt.engine.buckets)}, staged tensors: zero-copy {len(opt.engine.storage.staged_tensors())}, "
              f"fallback {len(staged.engine.storage.staged_tensors())}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
