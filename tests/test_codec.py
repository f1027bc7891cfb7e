"""The chunked compressors' fused C kernels (``rounds/_codec.c``) against the eager PyTorch path they
replace, bit for bit, and against the tensor-by-tensor reference where magnitudes tie.

In one process, on layouts hypothesis draws (tensor sizes, chunk sizes, bits, joined ranks): the
payload bytes, the residual left, the levels written and the decoded sums must be the same bytes.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from localsgd_optim import quantize, topk
from localsgd_optim.rounds import _kernel
from localsgd_optim.rounds.chunked import ChunkedReducer
from reference import chunked_compress_one_tensor

needs_kernels = pytest.mark.skipif(_kernel.codec(torch.device("cpu")) is None, reason="no C compiler")


class Bucket:
    def __init__(self, sizes: list[int]) -> None:
        self.numel = sum(sizes)
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.device, self.dtype = torch.device("cpu"), torch.float32


def _reducer(spec, bucket: Bucket, kernels: bool) -> tuple[ChunkedReducer, object]:
    reducer = ChunkedReducer([torch.zeros(bucket.numel)], spec)
    plan = reducer._plan(bucket)
    with pytest.MonkeyPatch.context() as m:
        m.setenv("LOCALSGD_OPTIM_KERNELS", "1" if kernels else "0")
        reducer._allocate(2, [bucket], [plan])
    assert (reducer._lib is not None) == kernels
    return reducer, plan


def _values(seed: int, n: int, ties: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if ties:  # small integers times a power of two: many equal magnitudes, zeros and -0 among them
        v = torch.randint(-2, 3, (n,), generator=g).float() * 2.0 ** torch.randint(-8, 8, (), generator=g).item()
        return torch.where(torch.rand(n, generator=g) < 0.1, torch.tensor(-0.0), v)
    return torch.randn(n, generator=g) * 10.0 ** torch.randint(-6, 4, (), generator=g).item()


def _round_trip(spec, bucket, kernels, v, joined, own, weight=None, divisor=1):
    """Build ``v = delta + residual`` (times ``weight``) and encode it as one rank; decode the payload twice
    into a sum, divided by ``divisor``: (payload, residual, levels, mean)."""
    reducer, plan = _reducer(spec, bucket, kernels)
    residual, payload = v.clone(), torch.zeros(plan.parts["total"][1], dtype=torch.uint8)
    delta = v.flip(0) * 0.5  # (the residual's elements in another order, halved)
    levels = torch.full_like(v, 7.0) if own else None
    if spec.sparse:
        reducer._encode_sparse(plan, residual, payload, joined, delta, weight)
    else:
        reducer._encode_dense(plan, residual, payload, joined, levels, delta, weight)
    total = torch.linspace(-1, 1, bucket.numel)
    if spec.sparse:
        decode = reducer._decode_sparse(plan)
        decode(plan, payload, total)
        decode(plan, payload, total)
        total.div_(divisor)
    else:
        reducer._decode_mean(plan, [payload, payload], total, divisor)
    return payload, residual, levels, total


def _same_bytes(a: torch.Tensor | None, b: torch.Tensor | None) -> None:
    assert (a is None) == (b is None)
    if a is not None:
        assert torch.equal(a.view(torch.uint8) if a.dtype != torch.uint8 else a,
                           b.view(torch.uint8) if b.dtype != torch.uint8 else b)


layouts = st.lists(st.integers(1, 700), min_size=1, max_size=5)


@needs_kernels
@settings(max_examples=60, deadline=None)
@given(sizes=layouts, chunk=st.sampled_from([1, 7, 64, 100, 256, 300]), bits=st.sampled_from([2, 4, 8]),
       joined=st.booleans(), own=st.booleans(), weight=st.sampled_from([None, 1, 3, 77]),
       divisor=st.sampled_from([1, 2, 3, 7]), seed=st.integers(0, 2 ** 31))
def test_dense_kernels_are_the_eager_path_bit_for_bit(sizes, chunk, bits, joined, own, weight, divisor, seed):
    spec, bucket = quantize(bits, chunk=chunk), Bucket(sizes)
    v = _values(seed, bucket.numel, ties=seed % 2 == 0)
    own = own and not joined
    fused = _round_trip(spec, bucket, True, v, joined, own, weight, divisor)
    eager = _round_trip(spec, bucket, False, v, joined, own, weight, divisor)
    for a, b in zip(fused, eager):
        _same_bytes(a, b)


@needs_kernels
@settings(max_examples=60, deadline=None)
@given(sizes=layouts, chunk=st.sampled_from([1, 7, 64, 256, 300, 4096]), fraction=st.sampled_from([0.01, 0.1, 0.5]),
       bits=st.sampled_from([None, 2, 4, 8]), joined=st.booleans(), weight=st.sampled_from([None, 1, 3]),
       seed=st.integers(0, 2 ** 31))
def test_topk_kernels_are_the_eager_path_bit_for_bit(sizes, chunk, fraction, bits, joined, weight, seed):
    """Distinct magnitudes (the eager path's torch.topk orders ties its own way)."""
    spec, bucket = topk(fraction, bits=bits, chunk=chunk), Bucket(sizes)
    v = _values(seed, bucket.numel, ties=False)
    built = ((v.flip(0) * 0.5 + v) * (weight or 1)).abs()
    if built.unique().numel() < v.numel():
        return  # a tie drawn by chance
    fused = _round_trip(spec, bucket, True, v, joined, False, weight, 3)
    eager = _round_trip(spec, bucket, False, v, joined, False, weight, 3)
    for a, b in zip(fused, eager):
        _same_bytes(a, b)


@needs_kernels
@settings(max_examples=60, deadline=None)
@given(sizes=layouts, chunk=st.sampled_from([1, 7, 64, 256, 300]), fraction=st.sampled_from([0.01, 0.1, 0.5]),
       bits=st.sampled_from([None, 2, 4]), seed=st.integers(0, 2 ** 31))
def test_topk_kernels_keep_the_earliest_of_equal_magnitudes(sizes, chunk, fraction, bits, seed):
    """Against the tensor-by-tensor reference (a stable sort by magnitude): what each tensor's chunks send,
    and the residual ``v - sent``, exactly (the values are small integers times a power of two: every
    sum of their squares is exact, in any order)."""
    spec, bucket = topk(fraction, bits=bits, chunk=chunk), Bucket(sizes)
    v = _values(seed, bucket.numel, ties=True)
    _, residual, _, total = _round_trip(spec, bucket, True, v, False, False)
    built = v.flip(0) * 0.5 + v
    sent = torch.cat([chunked_compress_one_tensor(t, spec) for t in built.split(sizes)])
    _same_bytes(residual, built - sent)
    _same_bytes(total, torch.linspace(-1, 1, bucket.numel) + sent + sent)


class _Done:
    def wait(self) -> None:
        pass


def _int8_round(sizes, kernels, v, joined, weight, divisor):
    """One int8 bucket as rank 0 of 2 whose peer sent the same payload: (codes, scales, residual, mean)."""
    from localsgd_optim.rounds.int8 import Int8Reducer

    bucket = Bucket(sizes)
    bucket.indices = list(range(len(sizes)))
    reducer = Int8Reducer([torch.zeros(bucket.numel)])
    with pytest.MonkeyPatch.context() as m:
        m.setenv("LOCALSGD_OPTIM_KERNELS", "1" if kernels else "0")
        reducer._allocate(2, [bucket])
    assert (reducer._lib is not None) == kernels
    reducer._gather = lambda out, mine, group, async_op=False: (out.view(-1, mine.numel()).copy_(mine), _Done())[1]
    target, residual = v.flip(0) * 0.5, v.clone()
    reducer._reduce_bucket(bucket, target, residual, None, 2, divisor, joined, weight)
    buf = reducer._buffers
    return buf["codes"][:bucket.numel].clone(), buf["scales"][:len(sizes)].clone(), residual, target


@needs_kernels
@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 700), min_size=1, max_size=5).filter(sum), joined=st.booleans(),
       weight=st.sampled_from([None, 1, 3, 77]), divisor=st.sampled_from([1, 2, 3, 7]), seed=st.integers(0, 2 ** 31))
def test_int8_kernels_are_the_eager_path_bit_for_bit(sizes, joined, weight, divisor, seed):
    v = _values(seed, sum(sizes), ties=seed % 2 == 0)
    fused = _int8_round(sizes, True, v, joined, weight, divisor)
    eager = _int8_round(sizes, False, v, joined, weight, divisor)
    for a, b in zip(fused, eager):
        _same_bytes(a, b)


def test_no_compiler_warns_once_and_runs_the_eager_path(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(_kernel, "_loaded", {})
    with pytest.warns(UserWarning, match="C kernels could not be built.*no-such-cc.*eager PyTorch path"):
        assert _kernel.codec(torch.device("cpu")) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _kernel.codec(torch.device("cpu")) is None  # decided once per process
    assert _kernel.codec(torch.device("meta")) is None  # never for other devices


@needs_kernels
def test_the_build_is_cached_and_keyed_by_its_inputs(monkeypatch, tmp_path):
    monkeypatch.setenv("LOCALSGD_OPTIM_CACHE", str(tmp_path))
    compiler = os.environ.get("CC") or "cc"
    first = _kernel._build(compiler)
    built = first.stat().st_mtime_ns
    assert _kernel._build(compiler) == first and first.stat().st_mtime_ns == built  # not rebuilt
    assert [p.name for p in Path(tmp_path).iterdir()] == [first.name]  # no temporary file left
    monkeypatch.setattr(_kernel, "FLAGS", _kernel.FLAGS + ("-DUNUSED",))
    assert _kernel._build(compiler) != first  # other flags: another build


@needs_kernels
def test_a_compiler_command_with_arguments_builds_a_library_everyone_may_load(monkeypatch, tmp_path):
    monkeypatch.setenv("LOCALSGD_OPTIM_CACHE", str(tmp_path))
    built = _kernel._build(f"{os.environ.get('CC') or 'cc'} -O1")  # e.g. CC="ccache gcc"
    umask = os.umask(0)
    os.umask(umask)
    assert built.stat().st_mode & 0o777 == 0o755 & ~umask  # (a shared cache serves every user)


def test_no_home_folder_builds_in_the_temp_folder(monkeypatch):
    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("LOCALSGD_OPTIM_CACHE", raising=False)
    monkeypatch.setattr(Path, "home", no_home)
    assert _kernel._cache().parent == Path(tempfile.gettempdir())


@needs_kernels
@pytest.mark.parametrize("spec", [quantize(2, chunk=64), quantize(8, chunk=64), topk(0.1, bits=2, chunk=64)])
def test_a_nan_gets_a_defined_code_and_stays_in_the_residual(spec):
    """Only with check_finite=False can a NaN reach the encoder: no undefined cast, the NaN kept."""
    bucket = Bucket([300])
    v = _values(0, 300, ties=False)
    v[[5, 200]] = float("nan")
    reducer, plan = _reducer(spec, bucket, True)
    payload = torch.zeros(plan.parts["total"][1], dtype=torch.uint8)
    residual = v.clone()
    (reducer._encode_sparse if spec.sparse else reducer._encode_dense)(plan, residual, payload, False)
    assert residual[5].isnan() and residual[200].isnan()


@needs_kernels
def test_a_compiler_without_march_native_builds_without_it(monkeypatch, tmp_path):
    cc = tmp_path / "cc-no-native"
    cc.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = "-march=native" ] && exit 1; done\nexec cc "$@"\n')
    cc.chmod(0o755)
    monkeypatch.setenv("LOCALSGD_OPTIM_CACHE", str(tmp_path / "cache"))
    built = _kernel._build(str(cc))
    assert built.exists() and [p.name for p in built.parent.iterdir()] == [built.name]
