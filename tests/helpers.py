"""Deterministic models and data shared by the tests."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def make_model(seed: int = 0, dtype=torch.float32) -> nn.Module:
    # 64x64 = 4096 elements: bigger than a 0.01 MiB bucket, so it takes the in-place path.
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4)).to(dtype)


def make_batches(n: int, rank: int | None = None, batch: int = 8, dtype=torch.float32):
    """``n`` batches that differ per rank (seeded by rank) but are reproducible."""
    rank = dist.get_rank() if rank is None else rank
    g = torch.Generator().manual_seed(1000 + rank)
    return [
        (torch.randn(batch, 16, generator=g, dtype=dtype), torch.randn(batch, 4, generator=g, dtype=dtype))
        for _ in range(n)
    ]


def mse(out, y):
    return ((out - y) ** 2).mean()


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def train_wrapped(model, opt, batches, loss_fn=mse):
    for x, y in batches:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()


INNER = {
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05),
}


def checkpoint_roundtrip(model, opt) -> dict:
    """Save model + optimizer as a user would and load it back with ``weights_only=True``."""
    import io

    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def resume_run(build, batches, stop, snapshot=params_of):
    """Train ``build()`` uninterrupted; then again, stopped at ``stop``, checkpointed, loaded
    into fresh objects and finished. Returns (uninterrupted, resumed, checkpoint)."""
    model, opt = build()
    train_wrapped(model, opt, batches)
    uninterrupted = snapshot(model)
    model, opt = build()
    train_wrapped(model, opt, batches[:stop])
    ckpt = checkpoint_roundtrip(model, opt)
    model, opt = build()
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    train_wrapped(model, opt, batches[stop:])
    return uninterrupted, snapshot(model), ckpt
