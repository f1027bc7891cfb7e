"""Run under torchrun: the same Local SGD training through Accelerate and as a bare loop.

Accelerate path: ``accelerator.prepare(model, LocalSGDOptimizer(...), loader, scheduler)``,
``accelerator.accumulate`` with 2 micro-batches per optimizer step, Accelerate's scheduler
stepping. Bare path: the same model, data shard and arithmetic by hand. Rank 0 writes every
rank's verdict, step counts, LRs seen and final parameters to ``argv[1]``.
"""

import sys

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset

from localsgd_optim import LocalSGDOptimizer

K, ACCUM, BATCH, N_BATCHES = 5, 2, 4, 48  # 24 micro-batches per rank: 12 steps, rounds at 5 and 10


def make():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))
    local = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=0.01), k=K)
    sched = torch.optim.lr_scheduler.StepLR(local, step_size=5, gamma=0.5)
    return model, local, sched


def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N_BATCHES * BATCH, 6, generator=g)
    y = torch.randn(N_BATCHES * BATCH, 2, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)


def with_accelerate(accelerator):
    model, local, sched = make()
    model, opt, loader, sched = accelerator.prepare(model, local, data(), sched)
    lrs = []
    with local.no_sync(model):  # Local SGD: DDP must not all-reduce gradients
        for x, y in loader:
            with accelerator.accumulate(model):
                loss = nn.functional.mse_loss(model(x), y)
                accelerator.backward(loss)
                opt.step()
                sched.step()
                opt.zero_grad()
            lrs.append(local.param_groups[0]["lr"])
    return [p.detach().clone() for p in model.parameters()], local, lrs


def bare(rank, world):
    model, local, sched = make()
    model = DDP(model)
    lrs, micro = [], 0
    with local.no_sync(model):
        for i, (x, y) in enumerate(data()):
            if i % world != rank:  # Accelerate's shard: batches rank, rank + world, ...
                continue
            micro += 1
            (nn.functional.mse_loss(model(x), y) / ACCUM).backward()
            if micro % ACCUM == 0:
                local.step()
                for _ in range(world):  # Accelerate steps the scheduler once per process
                    sched.step()
                local.zero_grad()
            lrs.append(local.param_groups[0]["lr"])
    return [p.detach().clone() for p in model.parameters()], local, lrs


def main():
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUM)
    rank, world = dist.get_rank(), dist.get_world_size()
    acc_params, acc_opt, acc_lrs = with_accelerate(accelerator)
    bare_params, bare_opt, bare_lrs = bare(rank, world)
    mine = {"equal": all(torch.equal(a, b) for a, b in zip(acc_params, bare_params)),
            "acc_steps": acc_opt.num_steps, "bare_steps": bare_opt.num_steps,
            "acc_state": acc_opt.state_dict()["local_sgd"]["num_steps"],
            "acc_lrs": acc_lrs, "bare_lrs": bare_lrs, "acc_params": [p.tolist() for p in acc_params]}
    result: list = [None] * world
    dist.all_gather_object(result, mine)  # every rank's verdict, not just rank 0's
    if rank == 0:
        torch.save(result, sys.argv[1])
    accelerator.wait_for_everyone()
    del acc_opt, bare_opt
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
