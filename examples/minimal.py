"""An ordinary DDP training loop turned into Local SGD by two changed lines (marked).

    torchrun --nproc-per-node 2 examples/minimal.py
"""

from __future__ import annotations

import gc

import torch
import torch.distributed as dist
from torch import nn

from localsgd_optim import LocalSGDOptimizer, no_sync


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    true_w = torch.randn(32, 1)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1)))
    opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=8)  # changed line 1
    g = torch.Generator().manual_seed(rank)  # each rank sees its own data
    with no_sync(model):  # changed line 2: DDP stops all-reducing gradients
        for step in range(1, 201):
            x = torch.randn(64, 32, generator=g)
            y = x @ true_w + 0.1 * torch.randn(64, 1, generator=g)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()  # every 8th step also averages the parameters across ranks
            opt.zero_grad()
            if step % 50 == 0 and rank == 0:
                print(f"step {step:4d}  loss {loss.item():.4f}", flush=True)
    opt.sync()  # replicas identical from here on (e.g. before saving)
    first = next(model.parameters()).detach()
    copies = [torch.empty_like(first) for _ in range(dist.get_world_size())]
    dist.all_gather(copies, first)
    if rank == 0:
        same = all(torch.equal(c, first) for c in copies)
        print(f"replicas identical after sync: {same}; averaging rounds: {opt.num_steps // opt.k}")


if __name__ == "__main__":
    main()
    # torch 2.13's gloo can abort at exit if a DDP module outlives the process group:
    # let main()'s objects go first.
    gc.collect()
    dist.destroy_process_group()
