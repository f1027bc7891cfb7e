"""Runs every ``<!-- snippet: NAME -->`` block of docs/migrating.md on this rank (under torchrun).

    torchrun --nproc-per-node 2 migrating_snippets.py DOC OUT_DIR

Each snippet gets a fresh namespace: ``torch``, ``nn``, ``dist``, a fresh ``model`` (the same
initial weights on every rank), this rank's ``loader`` (16 batches) and ``loss_fn``. Writes
OUT_DIR/rank<r>.pt: {snippet name: the final parameters of ``model``}.
"""

import os
import re
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

# On a machine without GPUs, a plain Accelerator() under torchrun is one process (DistributedType.NO);
# `accelerate launch --cpu` sets this.
os.environ.setdefault("ACCELERATE_USE_CPU", "true")
SNIPPET = re.compile(r"<!-- snippet: ([\w-]+) -->\n```python\n(.*?)```", re.S)


def namespace(rank):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    g = torch.Generator().manual_seed(100 + rank)
    loader = [(torch.randn(4, 8, generator=g), torch.randn(4, 1, generator=g)) for _ in range(16)]
    return {"torch": torch, "nn": nn, "dist": dist, "model": model, "loader": loader,
            "loss_fn": nn.functional.mse_loss}


def main():
    doc, out = Path(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {}
    for name, code in SNIPPET.findall(doc.read_text()):
        ns = namespace(rank)
        exec(compile(code, f"{doc.name}:{name}", "exec"), ns)  # noqa: S102 - our own documentation
        results[name] = [p.detach().clone() for p in ns["model"].parameters()]
        dist.barrier()
    torch.save(results, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
