"""Golden numerics and checkpoints recorded from the code before the round-strategy redesign.

``tests/fixtures/golden_v1.pt`` holds, for every variant on 2 and 3 ranks (hierarchical on 3
and 4), what the pre-redesign code produced: each rank's final parameters after an
uninterrupted run and each rank's checkpoint (model + optimizer state dict, format version 1)
taken mid-run. The current code must reproduce the final parameters bit for bit, write a
checkpoint with the same keys and the same values at the same step, and resume from the old
checkpoint to the same final parameters.

Re-recording is for a deliberate change of numerics or format only:
``python tests/test_golden.py`` (writes the fixture with the installed code).
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from helpers import assert_state_equal
from localsgd_optim import LocalSGDOptimizer, diloco, slowmo

FIXTURE = Path(__file__).parent / "fixtures" / "golden_v1.pt"
STEPS, STOP = 16, 7
CAP_MB = 0.0002  # 209 bytes: the 12x12 weight is its own (in-place) bucket, the rest are packed


def _model(seed: int, batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(12))
    layers += [nn.Tanh(), nn.Linear(12, 3)]
    return nn.Sequential(*layers)


def _batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(500 + rank)
    return [(torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)) for _ in range(STEPS)]


def _sgdm(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def _period(step: int) -> int:
    return 2 if step < 6 else 3


# name -> (inner optimizer, LocalSGDOptimizer keyword arguments, batchnorm model, world sizes)
VARIANTS: dict[str, tuple[Any, dict[str, Any], bool, tuple[int, ...]]] = {
    "plain_sgdm_k3": (_sgdm, {"k": 3}, False, (2, 3)),
    "plain_adamw_k4": (_adamw, {"k": 4}, False, (2, 3)),
    "plain_adamw_k4_nocheck": (_adamw, {"k": 4, "check_finite": False}, False, (2, 3)),
    "warmup4_k3": (_adamw, {"k": 3, "warmup_steps": 4}, False, (2, 3)),
    "pairs": (_sgdm, {"k": [(6, 2), (None, 4)], "warmup_steps": 1}, False, (2, 3)),
    "callable": (_adamw, {"k": _period}, False, (2, 3)),
    "buffers_bn": (_sgdm, {"k": 3, "buffers": "model"}, True, (2, 3)),
    "hierarchical": (_adamw, {"k": 6, "local_k": 2, "warmup_steps": 1}, False, (3, 4)),
    "diloco_warmup2_k4": (_adamw, {"k": 4, "warmup_steps": 2, "outer_optimizer": diloco()}, False, (2, 3)),
    "slowmo_k3": (_sgdm, {"k": 3, "outer_optimizer": slowmo()}, False, (2, 3)),
    "bf16_k4": (_adamw, {"k": 4, "compression": "bf16"}, False, (2, 3)),
    "bf16_diloco_k3": (_adamw, {"k": 3, "compression": "bf16", "outer_optimizer": diloco()}, False, (2, 3)),
    "int8_diloco_k3": (_adamw, {"k": 3, "compression": "int8", "outer_optimizer": diloco()}, False, (2, 3)),
    "int8_k2": (_sgdm, {"k": 2, "compression": "int8"}, False, (2, 3)),
    # k=3, tau=2: launched at 3, 6, 9 and landing at 5, 8, 11; at STOP=7 a round is in flight
    "overlap_diloco_k3_t2": (_adamw, {"k": 3, "overlap_steps": 2, "outer_optimizer": diloco()}, False, (2, 3)),
    "overlap_plain_k4_t1_mix0": (_sgdm, {"k": 4, "overlap_steps": 1, "overlap_mix": 0.0}, False, (2, 3)),
    # added for issue 23 (one layout), recorded from the code before it
    "fragments2_k4": (_adamw, {"k": 4, "fragments": 2}, False, (2, 3)),
    "fragments3_diloco_k6": (_adamw, {"k": 6, "fragments": 3, "outer_optimizer": diloco()}, False, (2, 3)),
    "fragments2_overlap_k4_t1": (_sgdm, {"k": 4, "fragments": 2, "overlap_steps": 1}, False, (2, 3)),
    "fragments2_int8_k4": (_sgdm, {"k": 4, "fragments": 2, "compression": "int8"}, False, (2, 3)),
    "avgstate_adamw_k3": (_adamw, {"k": 3, "average_optimizer_state": True}, False, (2, 3)),
    "avgstate_warmup2_sgdm_k3": (_sgdm, {"k": 3, "warmup_steps": 2, "average_optimizer_state": True}, False, (2, 3)),
    "copy_engine_k3": (_adamw, {"k": 3, "flat_params": False}, False, (2, 3)),
    "copy_engine_diloco_k3": (_adamw, {"k": 3, "flat_params": False, "outer_optimizer": diloco()}, False, (2, 3)),
    "copy_engine_bf16_k4": (_adamw, {"k": 4, "flat_params": False, "compression": "bf16"}, False, (2, 3)),
    "copy_engine_int8_k4": (_sgdm, {"k": 4, "flat_params": False, "compression": "int8"}, False, (2, 3)),
    "copy_engine_overlap_k3_t2": (_adamw, {"k": 3, "flat_params": False, "overlap_steps": 2,
                                           "outer_optimizer": diloco()}, False, (2, 3)),
}
CASES = [(name, world) for name, (*_, worlds) in VARIANTS.items() for world in worlds]


def _build(name: str):
    inner, kwargs, batchnorm, _ = VARIANTS[name]
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _model(seed=rank, batchnorm=batchnorm)
    kwargs = dict(kwargs, bucket_cap_mb=CAP_MB)
    if kwargs.get("buffers") == "model":
        kwargs["buffers"] = model
    if "local_k" in kwargs:  # two "hosts": the first two ranks, and the rest
        groups = [list(range(min(2, world))), list(range(2, world))]
        kwargs["local_group"], _ = dist.new_subgroups_by_enumeration([g for g in groups if g])
    return model, LocalSGDOptimizer(inner(model.parameters()), **kwargs)


def _train(model, opt, batches, sync_after: int | None = None) -> None:
    for step, (x, y) in enumerate(batches, start=1):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if step == sync_after:  # an explicit sync() mid-period, between scheduled rounds
            opt.sync()


def _snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in model.state_dict().values()]


def _blob(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _record(name: str) -> dict[str, Any]:
    """Run ``name`` uninterrupted; then to STOP, and checkpoint there."""
    batches = _batches(dist.get_rank())
    model, opt = _build(name)
    _train(model, opt, batches, sync_after=10)
    final = _snapshot(model)
    model, opt = _build(name)
    _train(model, opt, batches[:STOP])
    ckpt = _blob({"model": model.state_dict(), "opt": opt.state_dict()})
    return {"final": final, "checkpoint": ckpt}


def _replay(name: str, old_checkpoint: bytes) -> dict[str, Any]:
    """Today's code: the uninterrupted run, its checkpoint at STOP, and a resume from the old one."""
    got = _record(name)
    batches = _batches(dist.get_rank())
    model, opt = _build(name)
    old = torch.load(io.BytesIO(old_checkpoint), weights_only=True)
    model.load_state_dict(old["model"])
    opt.load_state_dict(old["opt"])
    for step, (x, y) in enumerate(batches[STOP:], start=STOP + 1):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if step == 10:
            opt.sync()
    got["resumed"] = _snapshot(model)
    return got


def _canary() -> list[torch.Tensor]:
    """The fixture's model trained alone, no library, no process group: what this CPU's kernels compute.

    Matmul rounding differs between CPUs; a fixture recorded on another one fails every case.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers run (a matmul's rounding also depends on its threads)
    try:
        model = _model(seed=0, batchnorm=True)
        opt = _adamw(model.parameters())
        for x, y in _batches(0):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        return _snapshot(model)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    recorded = torch.load(FIXTURE, weights_only=True)
    canary = recorded.get("canary")
    if canary is not None and not all(torch.equal(a, b) for a, b in zip(_canary(), canary)):
        pytest.fail(
            "tests/fixtures/golden_v1.pt was recorded on a CPU whose float kernels round differently from this "
            "one's (a plain training run without localsgd_optim already differs). Re-record it on this machine "
            "from the code before your change: check that commit out and run `python tests/test_golden.py`."
        )
    return recorded


@pytest.mark.parametrize("name, world", CASES, ids=[f"{n}-{w}ranks" for n, w in CASES])
def test_golden_numerics_and_checkpoints(request, golden, name, world):
    run = request.getfixturevalue({2: "ranks2", 3: "ranks3", 4: "ranks4"}[world])
    recorded = golden[f"{name}/{world}"]
    results = run(_replay_rank, name, [r["checkpoint"] for r in recorded])
    for rank, (got, want) in enumerate(zip(results, recorded)):
        assert_state_equal(got["final"], want["final"], f"rank {rank} final parameters")
        assert_state_equal(got["resumed"], want["final"], f"rank {rank} resumed from the old checkpoint")
        new = torch.load(io.BytesIO(got["checkpoint"]), weights_only=True)
        old = torch.load(io.BytesIO(want["checkpoint"]), weights_only=True)
        assert_state_equal(new, old, f"rank {rank} checkpoint at step {STOP}")


def _replay_rank(name: str, checkpoints: list[bytes]) -> dict[str, Any]:
    return _replay(name, checkpoints[dist.get_rank()])


def _record_all() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from workers import WorkerPool

    import test_golden  # spawned workers import the function by this module's name

    out: dict[str, Any] = {}
    for world in (2, 3, 4):
        pool = WorkerPool(world)
        try:
            for name, w in CASES:
                if w == world:
                    out[f"{name}/{world}"] = pool.run(test_golden._record, name)
                    print(f"recorded {name} on {world} ranks", flush=True)
        finally:
            pool.close()
    out["canary"] = _canary()
    FIXTURE.parent.mkdir(exist_ok=True)
    torch.save(out, FIXTURE)
    print(f"wrote {FIXTURE} ({os.path.getsize(FIXTURE)} bytes)")


if __name__ == "__main__":
    _record_all()
