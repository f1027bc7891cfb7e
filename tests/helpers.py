"""Deterministic models and data shared by the tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


def assert_same(actual, expected, exact, rtol=1e-5, atol=1e-6):
    """Bit-for-bit when ``exact``; else within float rounding (a wrong divisor is off by >30%)."""
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert a.dtype == e.dtype and a.shape == e.shape, f"parameter {i}"
        if exact:  # zero tolerance; a NaN matches only a NaN in the same place
            torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True, msg=f"parameter {i} differs")
        else:
            torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=f"parameter {i}")


def assert_state_equal(got, want, where: str = "state_dict") -> None:
    """Nested dicts and lists equal, tensors bit for bit: nothing changed."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want), \
            f"{where}: {got!r} != {want!r}"
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), f"{where}: keys {list(got)} != {list(want)}"
        for key in want:
            assert_state_equal(got[key], want[key], f"{where}[{key!r}]")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), f"{where} changed length"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_state_equal(g, w, f"{where}[{i}]")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


# -- running scripts the way users do -----------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


# torch 2.13's gloo sometimes aborts a rank in its C++ teardown, after the script finished
# (also with plain DDP and no localsgd_optim: ~2/10 runs under load here). Only that exact
# signature earns one retry; any other failure, or the same one twice, fails the test.
TEARDOWN_ABORT = "terminate called without an active exception"


def run(cmd: list[str], timeout: int = 240) -> str:
    """Run ``cmd`` from the repository root; retry once only on the gloo teardown abort.

    The scripts mean CPU: on a machine with a GPU, Accelerate, Lightning and the bench would
    otherwise put every rank on it (NCCL refuses two ranks on one GPU).
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    for attempt in range(2):
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode == 0 or TEARDOWN_ABORT not in done.stderr or attempt == 1:
            break
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def torchrun(*args: str, nproc: int = 2) -> str:
    return run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", *args])


# The small main job several tests start from: 24 steps, k=4, 2 ranks. Its uninterrupted run is the
# same command wherever it runs (and bit-for-bit reproducible), so the session runs it once: the
# ``charlm_uninterrupted`` fixture of conftest.py.
CHARLM = ["examples/train_charlm.py", "--steps", "24", "--k", "4", "--eval-every", "12", "--d-model", "32",
          "--layers", "1", "--max-bytes", "200000", "--eval-batches", "2"]
