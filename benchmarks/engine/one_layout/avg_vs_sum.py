"""Gloo ``AVG`` against ``SUM`` + ``div_`` on one flat fp32 buffer, interleaved round by round.

Torch only (no localsgd_optim import), so it runs whatever state the package is in:

    torchrun --nproc-per-node 2 benchmarks/engine/one_layout/avg_vs_sum.py --mb 144,36 --rounds 20

A round's time is the slowest rank's; medians over the timed rounds.
"""

import argparse
import statistics
import time

import torch
import torch.distributed as dist


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mb", default="144,36")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    for mb in (float(v) for v in args.mb.split(",")):
        buf = torch.zeros(int(mb * 2**20) // 4)

        def flat_sum() -> None:
            dist.all_reduce(buf)

        def avg() -> None:
            dist.all_reduce(buf, op=dist.ReduceOp.AVG)

        def sum_div() -> None:
            dist.all_reduce(buf)
            buf.div_(world)

        def check_sum_div() -> None:
            buf.sum()
            dist.all_reduce(buf)
            buf.div_(world)

        def div_only() -> None:
            buf.div_(world)

        def read_only() -> None:
            buf.sum()

        methods = {"SUM (flat limit)": flat_sum, "AVG": avg, "SUM + div_": sum_div,
                   "sum() + SUM + div_": check_sum_div, "div_ alone": div_only, "sum() alone": read_only}
        times = {k: [] for k in methods}
        for r in range(args.warmup + args.rounds):
            for name, fn in methods.items():
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                if r >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
        ref = None
        if dist.get_rank() == 0:
            print(f"\n== {mb:g} MB fp32, {world} ranks, gloo, {args.rounds} rounds ==")
            print(f"{'method':<22} {'median ms':>10} {'x SUM':>7}")
        for name in methods:
            t = torch.tensor(times[name], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            ms = 1e3 * statistics.median(t.tolist())
            ref = ref or ms
            if dist.get_rank() == 0:
                print(f"{name:<22} {ms:>10.2f} {ms / ref:>7.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
