"""Issue 34: the transient memory of a compressed round, counted byte by byte (deterministic on CPU).

Every storage an op allocates inside a round is counted while it lives (:class:`LiveBytes`); the
peak is compared with what the issue allows a compressed round besides the residual: one bucket
(padded to whole chunks for the chunked compressors), this rank's payload, the W gathered payloads,
and (top-k) a few indices per value sent. The same rounds on a model twice as large must peak at
the same bytes: the peak is flat in the model's size.
"""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from localsgd_optim import LocalSGDOptimizer, quantize, topk


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages allocated by ops inside the block and still alive, and their peak.

    A storage is known by its C++ object (``_cdata``), never by its address: a freed block's address
    is reused at once. An output whose storage an input holds (a view, an in-place op, a collective's
    output) allocated nothing.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._alive: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._alive.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        given = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage._cdata, storage.nbytes()
            if nbytes == 0 or key in given or key in self._alive:
                continue
            self._alive.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, nbytes)
        return out


SPECS = {"topk1_2bit": topk(0.01, bits=2, chunk=1024), "topk10_fp32": topk(0.1, chunk=1024),
         "int4": quantize(4, chunk=1024), "int2": quantize(2, chunk=1000), "int8": "int8",
         "int4_rs": quantize(4, chunk=1024, collective="reduce_scatter"),
         "int2_rs": quantize(2, chunk=1000, collective="reduce_scatter")}
CAP_MB = 0.25  # 65536 fp32 elements per bucket


def _model(layers: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(128, 128) for _ in range(layers)])  # 2 layers fill a bucket


def _round_bytes(name: str, layers: int) -> dict:
    model = _model(layers)
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), k=1, compression=SPECS[name],
                            bucket_cap_mb=CAP_MB)
    g = torch.Generator().manual_seed(dist.get_rank())
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    with LiveBytes() as cold:  # the first round allocates the reducer's buffers too
        opt.step()
    with LiveBytes() as warm:
        opt.step()
    reducer = opt._rounds.scheduled.reducer
    buckets = opt.engine.buckets
    plans = [reducer._plan(b) for b in buckets] if name != "int8" else []
    if name.endswith("_rs"):  # the shards' plans: a slot, a shard's scratch and codes
        world = dist.get_world_size()
        shards = [p for b in buckets for _, _, p in reducer._shards(b, world)]
        return {"cold": cold.peak, "warm": warm.peak, "buckets": len(buckets), "world": world,
                "buffers": sum(b.numel() * b.element_size() for b in reducer._buffers.values()),
                "second": sum(r.numel() * r.element_size() for r in reducer.second),
                "tensors": max(len(b.indices) for b in buckets), "shard": max(p.numel for p in shards),
                "padded": max(p.chunks for p in shards) * reducer.spec.chunk,
                "slot": max(p.parts["total"][1] for p in shards),
                "payload": max(p.parts["total"][1] for p in plans),
                "constants": sum(t.numel() * t.element_size() for p in plans + shards  # made once per layout
                                 for t in (p.starts, p.kept, p.count, p.short))}
    return {"cold": cold.peak, "warm": warm.peak, "buffers": sum(b.numel() * b.element_size()
                                                               for b in reducer._buffers.values()),
            "buckets": len(buckets), "bucket": max(b.numel for b in buckets),
            "tensors": max(len(b.indices) for b in buckets),
            "payload": max(p.parts["total"][1] for p in plans) if plans else max(b.numel + 4 * len(b.indices)
                                                                                  for b in buckets),
            "sent": max((p.sent for p in plans), default=0)}


@pytest.mark.parametrize("name", [name for name in SPECS if not name.endswith("_rs")])
def test_a_round_adds_one_bucket_and_the_payloads_whatever_the_model_size(ranks2, name):
    small, large = ranks2(_round_bytes, name, 6)[0], ranks2(_round_bytes, name, 12)[0]
    assert (small["buckets"], large["buckets"]) == (2, 4)
    spec, world, n = SPECS[name], 2, small["bucket"]
    if name == "int8":
        bound = 4 * n + (world + 1) * small["payload"] + 64 * small["tensors"]  # a scratch, payloads, the scales
    else:
        scratch = 4 * (n + small["tensors"] * (spec.chunk - 1))  # the bucket padded to whole chunks, at most
        bound = scratch + (world + 1) * small["payload"]
        if spec.sparse:  # per value sent: its chunk, its place (int64), its value and what is decoded
            bound += 64 * small["sent"]
        else:  # the codes one byte each, and float64 squares of an eighth of the scratch at a time
            bound += n + scratch // 4
    for got in (small, large):
        assert got["cold"] <= bound, (got, bound)
        assert got["warm"] + got["buffers"] <= bound, (got, bound)
    # flat: a model twice as large peaks at the same bytes (to the control collective's few bytes, which
    # gloo's thread releases when it gets to it)
    assert large["buffers"] == small["buffers"] and abs(large["warm"] - small["warm"]) <= 256, f"{small} {large}"


@pytest.mark.parametrize("ranks", [2, 3], indirect=True)
@pytest.mark.parametrize("name", ["int4_rs", "int2_rs"])
def test_a_reduce_scatter_round_adds_a_shard_and_one_payload_per_stage(ranks, name):
    """Per stage, W slots of 1/W of a payload each (the all-to-all's W sent and W received, then this
    rank's slot and the W gathered), and the scratch, codes and squares of one shard: about 1/W of the
    all-gather's W payloads and bucket. The cold round also allocates the second residuals (persistent,
    1/W of the model in fp32: state, like the first residuals) and the plans' per-chunk constants."""
    small, large = ranks(_round_bytes, name, 6)[0], ranks(_round_bytes, name, 12)[0]
    assert (small["buckets"], large["buckets"]) == (2, 4)
    world, chunk = small["world"], SPECS[name].chunk
    # a slot: a shard's steps and codes; W slots hold one payload, plus a chunk's codes and steps per shard
    assert world * small["slot"] <= small["payload"] + world * (8 + 4 + chunk * SPECS[name].bits // 8), small
    # a shard of whole chunks: 1/W of the bucket's chunks, up to one chunk more
    assert small["padded"] <= (65536 + small["tensors"] * (chunk - 1)) // world + chunk, small
    bound = 4 * small["padded"] + small["shard"] + small["padded"] + (2 * world + 1) * small["slot"]
    for got in (small, large):
        assert got["cold"] <= bound + got["second"] + got["constants"], (got, bound)
        assert got["warm"] + got["buffers"] <= bound, (got, bound)
    assert large["second"] == 2 * small["second"]  # state: 1/W of the model
    assert large["buffers"] == small["buffers"] and abs(large["warm"] - small["warm"]) <= 256, f"{small} {large}"
