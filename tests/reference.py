"""The test oracle: Local SGD written for clarity, one parameter and one collective at a time.

Nothing here is shared with the library: no buckets, no flattening, no async.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


@torch.no_grad()
def average_one_by_one(params, group=None) -> None:
    world = dist.get_world_size(group)
    for p in params:
        dist.all_reduce(p, op=dist.ReduceOp.SUM, group=group)
        p.div_(world)


@torch.no_grad()
def broadcast_one_by_one(params, src=0, group=None) -> None:
    for p in params:
        dist.broadcast(p, src, group=group)


def train_local_sgd_reference(model, inner, k, batches, loss_fn, sync_on_init=True):
    """Plain loop: inner step on every batch, average parameter by parameter after steps k, 2k, ..."""
    params = [p for g in inner.param_groups for p in g["params"]]
    if sync_on_init:
        broadcast_one_by_one(params)
    for step, (x, y) in enumerate(batches, start=1):
        inner.zero_grad()
        loss_fn(model(x), y).backward()
        inner.step()
        if step % k == 0:
            average_one_by_one(params)
