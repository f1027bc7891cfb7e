"""CUDA parameters: 2 gloo ranks sharing ``cuda:0`` (NCCL refuses two ranks on one GPU).

Skipped without CUDA. Gloo reduces CUDA tensors through host copies, so the arithmetic is
the same as on CPU and the one-by-one reference is exact on 2 ranks.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from helpers import assert_same, make_batches, make_model, mse, params_of
from localsgd_optim import LocalSGDOptimizer, NonFiniteParameterError
from reference import average_one_by_one

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

DEVICE = "cuda:0"


def _cuda_batches(n):
    return [(x.to(DEVICE), y.to(DEVICE)) for x, y in make_batches(n)]


class MixedDtypes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 32).to(torch.bfloat16)
        self.c = nn.Linear(32, 4).to(torch.float16)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.tanh(self.b(h.bfloat16())).float()
        return self.c(h.half()).float()


def _mixed_dtype_averaging(flat_params):
    torch.manual_seed(dist.get_rank())
    model = MixedDtypes().to(DEVICE)
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), k=3, bucket_cap_mb=0.001,
                            sync_on_init=False, flat_params=flat_params)
    expected = None
    for step, (x, y) in enumerate(_cuda_batches(6), start=1):
        opt.zero_grad()
        mse(model(x), y).backward()
        if step == 6:  # the reference for the last round: this step's update, then one by one
            with torch.no_grad():
                ref = [p.detach().clone() for p in model.parameters()]
                shadow = torch.optim.SGD(ref, lr=0.05)
                for r, p in zip(ref, model.parameters()):
                    r.grad = p.grad.clone()
                shadow.step()
                average_one_by_one(ref)
                expected = [r.cpu() for r in ref]
        opt.step()
    return [p.detach().cpu() for p in model.parameters()], expected


@pytest.mark.parametrize("flat_params", [True, False], ids=["flat", "copy-engine"])
def test_mixed_fp32_bf16_fp16_averaging_matches_reference(ranks2, flat_params):
    for got, want in ranks2(_mixed_dtype_averaging, flat_params):
        assert_same(got, want, exact=True)


def _grad_scaler_fused_adamw():
    rank = dist.get_rank()
    poison = 2 if rank == 1 else -1  # an inf loss on rank 1 only: its step is skipped there
    model = make_model(seed=0).to(DEVICE)
    opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True), k=4)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**8)
    for i, (x, y) in enumerate(_cuda_batches(8)):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = mse(model(x).float(), y)
        scaler.scale(loss * float("inf") if i == poison else loss).backward()
        scaler.step(opt)
        scaler.update()
    return [p.cpu() for p in params_of(model)], opt.num_steps, scaler.get_scale()


def test_grad_scaler_with_fused_adamw_and_a_step_skipped_on_one_rank(ranks2):
    results = ranks2(_grad_scaler_fused_adamw)
    for rank, (params, num_steps, scale) in enumerate(results):
        assert num_steps == 8 and all(torch.isfinite(p).all() for p in params)
        assert scale == (2.0**7 if rank == 1 else 2.0**8)
    assert_same(results[1][0], results[0][0], exact=True)  # equal after the round at step 8


def _nan_guard():
    model = make_model(seed=0).to(DEVICE)
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), k=2)
    if dist.get_rank() == 1:
        with torch.no_grad():
            model[2].weight[3, 5] = float("nan")
    before = params_of(model)
    with pytest.raises(NonFiniteParameterError, match=r"rank 1: parameter \(param group 0, index 2\)"):
        opt.sync()
    return [p.cpu() for p in before], [p.cpu() for p in params_of(model)]


def test_nan_guard_on_cuda_leaves_every_replica_alone(ranks2):
    for before, after in ranks2(_nan_guard):
        assert_same(after, before, exact=True)


def _inductor_across_rounds():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = make_model(seed=dist.get_rank()).to(DEVICE)
    opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=2)
    compiled = torch.compile(model)  # inductor
    for x, y in _cuda_batches(8):  # 4 rounds
        opt.zero_grad()
        mse(compiled(x), y).backward()
        opt.step()
    recompiles = sum(counters["recompiles"].values()) if "recompiles" in counters else 0
    return dict(counters["stats"]).get("unique_graphs"), recompiles, [p.cpu() for p in params_of(model)]


def test_inductor_compile_across_rounds_without_recompiles(ranks2):
    results = ranks2(_inductor_across_rounds)
    for graphs, recompiles, _ in results:
        assert graphs == 1 and recompiles == 0
    assert_same(results[1][2], results[0][2], exact=True)


def _compressed_on_cuda(spec, flat_params):
    from localsgd_optim import diloco
    from reference import reference_chunked_diloco, reference_int8_diloco, reference_reduce_scatter_diloco

    batches = _cuda_batches(8)
    ref = make_model(seed=dist.get_rank()).to(DEVICE)
    inner = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    if spec == "int8":
        reference_int8_diloco(ref, inner, batches, 4, diloco())
    elif spec.collective == "reduce_scatter":
        reference_reduce_scatter_diloco(ref, inner, batches, 4, diloco(), spec)
    else:
        reference_chunked_diloco(ref, inner, batches, 4, diloco(), spec)
    model = make_model(seed=dist.get_rank()).to(DEVICE)
    opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=4, compression=spec,
                            outer_optimizer=diloco(), bucket_cap_mb=0.01, flat_params=flat_params)
    for x, y in batches:
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()
    residuals = opt.state_dict()["local_sgd"]["ef_residuals" if spec != "int8" else "int8_residuals"]
    return ([p.detach().cpu() for p in model.parameters()], [p.detach().cpu() for p in ref.parameters()],
            all(r.is_cuda for r in residuals))


def _cuda_specs():
    from localsgd_optim import quantize, topk

    return {"topk2bit": topk(0.05, bits=2, chunk=1000), "topk_fp32": topk(0.1, chunk=512),
            "topk8bit_uint8_positions": topk(0.05, bits=8, chunk=64), "int4": quantize(4, chunk=300),
            "int2": quantize(2, chunk=4096), "int8": "int8",
            "int4_reduce_scatter": quantize(4, chunk=300, collective="reduce_scatter")}


@pytest.mark.parametrize("flat_params", [True, False], ids=["flat", "copy-engine"])
@pytest.mark.parametrize("which", ["topk2bit", "topk_fp32", "topk8bit_uint8_positions", "int4", "int2", "int8",
                                   "int4_reduce_scatter"])
def test_every_compressor_on_cuda_matches_the_reference(ranks2, which, flat_params):
    """Every compressor runs on CUDA tensors (the streamed rounds are device-agnostic) and matches the
    per-tensor reference bit for bit; gloo moves the payloads through host copies."""
    results = ranks2(_compressed_on_cuda, _cuda_specs()[which], flat_params)
    for got, want, on_cuda in results:
        assert on_cuda
        assert_same(got, want, exact=True)
    assert_same(results[1][0], results[0][0], exact=True)
