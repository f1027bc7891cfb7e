"""Property tests (hypothesis): every round strategy against a tiny per-parameter oracle, on 2 real gloo ranks.

Each example draws a *spec*: plain data describing 1..6 parameters (shapes with zero-size dims
and 0-d, four float dtypes and complex64 where the strategy takes it, transposed / channels_last /
non-dense strides, views of another parameter's memory, the same Parameter listed twice, frozen
flags, an int64 parameter), optionally a module of buffers (float and int64) and a bucket cap.
Both ranks build the tensors from the spec with rank-dependent values, run the strategy's round
with an inner ``SGD(lr=0.0)`` (so inner steps never move a parameter), and send every tensor
back; the expected values are computed here, in the pytest process, one parameter at a time.

The semantics asserted are the intended ones, for every strategy:

* each averaged tensor ends as the oracle says (bit-exact, except the compressed strategies,
  compared within a stated tolerance);
* a parameter with ``requires_grad=False`` is never changed by a round (compared with its
  value right before the first step), nor is a non-floating parameter or an integer buffer;
* aliased parameters (a view of another's memory, or one Parameter listed twice) end as the
  oracle applied once to their memory, and stay aliased;
* buffers passed as ``buffers=`` end as their plain mean;
* or the constructor (or a step) refuses the example, identically on both ranks, with a
  ``ValueError``/``TypeError`` whose message names the strategy's argument, a parameter (the
  library's "param group g, index i") or a buffer (see ``MENTIONS``). Refusals are counted: a
  strategy that refuses every example fails.

Also checked: construction without ``sync_on_init`` changes no value; with it, every trainable
parameter holds rank 0's value afterwards; after a blocking compressed round the replicas are
bit-identical.

``specs(strategy, features)`` can be narrowed to a subset of ``FEATURES`` (e.g. to find which
feature breaks a strategy: ``specs("outer", frozenset({"views"}))``); the tests draw all of them.

Oracles (``x_r``: rank r's value when the round runs, ``g``: the outer global copy, i.e. rank
0's values broadcast at construction):

* plain, copy engine, fragments, optimizer state: ``(x_0 + x_1) / 2`` in the tensor's dtype
  (with 2 ranks the sum commutes, so this is bit-exact; averaging already-equal values is exact,
  so the per-parameter loop is an oracle for aliased memory too);
* outer (SGD lr=1): ``d_r = g - x_r; m = (d_0 + d_1) / 2; g.add(m, alpha=-1.0)``, bit-exact;
* bf16: the same in float64, within ``2**-7 * (max|d_0| + max|d_1|)`` (twice the worst error of
  casting both deltas to bf16 and summing them in bf16, halved) plus 4 ulps of the dtype at the
  values' scale (the deltas are first computed in the parameter's dtype);
* int8: the same in float64, within ``(s_0 + s_1) / 2`` with ``s_r = max|d_r| / 127`` (twice the
  worst rounding of per-tensor int8 codes) plus 4 ulps of the dtype;
* overlap (launched at step 2, landed at step 3, mix 0.5): ``torch.lerp(x_r, outer_new, 0.5)``,
  bit-exact;
* momentum buffers (optimizer state): ``(b_0 + b_1) / 2``, ``b_r`` taken from a twin plain SGD
  given the same gradients.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

FLOATS = ["float32", "float64", "float16", "bfloat16"]
COMPLEX = ["complex64"]
INT = "int64"
LAYOUTS = ["contig", "transposed", "channels_last", "strided"]

# name -> steps run (the round fires at the last), whether sync_on_init is on, which oracle, whether complex
# parameters and buffers= are drawn. The constructor's kwargs come from _kwargs(name), built on the ranks
# (outer-optimizer factories are lambdas: they do not pickle).
STRATEGIES: dict[str, dict[str, Any]] = {
    "plain": dict(steps=1, sync=False, oracle="mean", complex=True, buffers=True),
    "copy": dict(steps=1, sync=False, oracle="mean", complex=True, buffers=True),
    "outer": dict(steps=1, sync=True, oracle="outer", complex=False, buffers=True),
    "bf16": dict(steps=1, sync=True, oracle="bf16", complex=False, buffers=False),
    "int8": dict(steps=1, sync=True, oracle="int8", complex=False, buffers=False),
    "overlap": dict(steps=3, sync=True, oracle="overlap", complex=False, buffers=True),
    "fragments": dict(steps=2, sync=False, oracle="mean", complex=True, buffers=True, min_trainable=2),
    "state": dict(steps=1, sync=False, oracle="mean", complex=True, buffers=True, momentum=0.9),
    # the copy engine under the rounds that compute on the flat layout (its staging copy)
    "copy_outer": dict(steps=1, sync=True, oracle="outer", complex=False, buffers=True),
    "copy_bf16": dict(steps=1, sync=True, oracle="bf16", complex=False, buffers=False),
    "copy_int8": dict(steps=1, sync=True, oracle="int8", complex=False, buffers=False),
    "copy_overlap": dict(steps=3, sync=True, oracle="overlap", complex=False, buffers=True),
}

# What a refusal's message must name (one of): the strategy's own arguments, or the library's names for a
# parameter ("parameter (param group 0, index 1)") or a buffer. torch's bare "optimizer got an empty parameter
# list" names neither.
COMMON_MENTIONS = ["param group", "requires_grad", "buffer", "bucket_cap_mb"]
MENTIONS = {
    "plain": ["k=1"],
    "copy": ["flat_params"],
    "outer": ["outer_optimizer", "sync_on_init"],
    "bf16": ["compression"],
    "int8": ["compression"],
    "overlap": ["overlap_steps", "overlap_mix"],
    "fragments": ["fragments"],
    "state": ["average_optimizer_state"],
    "copy_outer": ["outer_optimizer", "sync_on_init", "flat_params"],
    "copy_bf16": ["compression", "flat_params"],
    "copy_int8": ["compression", "flat_params"],
    "copy_overlap": ["overlap_steps", "overlap_mix", "flat_params"],
}


def _kwargs(name: str) -> dict[str, Any]:
    from localsgd_optim import diloco

    return {
        "plain": dict(k=1, sync_on_init=False),
        "copy": dict(k=1, sync_on_init=False, flat_params=False),
        "outer": dict(k=1, outer_optimizer=diloco(lr=1.0, momentum=0.0)),
        "bf16": dict(k=1, compression="bf16"),
        "int8": dict(k=1, compression="int8"),
        "overlap": dict(k=2, overlap_steps=1),
        "fragments": dict(k=2, fragments=2, sync_on_init=False),
        "state": dict(k=1, sync_on_init=False, average_optimizer_state=True),
        "copy_outer": dict(k=1, flat_params=False, outer_optimizer=diloco(lr=1.0, momentum=0.0)),
        "copy_bf16": dict(k=1, flat_params=False, compression="bf16"),
        "copy_int8": dict(k=1, flat_params=False, compression="int8"),
        "copy_overlap": dict(k=2, flat_params=False, overlap_steps=1),
    }[name]


# -- drawing specs (pytest process) -----------------------------------------------------------

def _view_shape(shape: list[int], how: str) -> list[int]:
    if how == "rows":
        return [(shape[0] + 1) // 2] + shape[1:]
    if how == "cols":
        return [shape[0], (shape[1] + 1) // 2] + shape[2:]
    return list(shape)


#: what a spec may contain beyond fresh, trainable, contiguous float32/float64 parameters of non-zero size
FEATURES = frozenset({"zero_size", "low_precision", "complex", "layouts", "views", "duplicates", "frozen", "integer",
                      "buffers", "small_buckets"})


@st.composite
def specs(draw, strategy: str, features: frozenset = FEATURES) -> dict[str, Any]:
    """A spec for ``strategy``; ``features`` narrows what may be drawn (every feature by default)."""
    cfg = STRATEGIES[strategy]
    dtypes = ["float32", "float64"] + (["float16", "bfloat16"] if "low_precision" in features else []) \
        + (COMPLEX if cfg["complex"] and "complex" in features else [])
    kinds = ["new", "new"] + (["view"] if "views" in features else []) + (["dup"] if "duplicates" in features else [])
    low = 0 if "zero_size" in features else 1
    min_trainable = cfg.get("min_trainable", 0)
    n = draw(st.integers(max(1, min_trainable), 6))
    params: list[dict[str, Any]] = []
    for i in range(n):
        forced = i < min_trainable  # fresh, trainable, floating: the strategy needs this many
        kind = "new" if forced else draw(st.sampled_from(kinds))
        sources = [j for j, p in enumerate(params) if p["dtype"] != INT]
        if kind != "new" and not sources:
            kind = "new"
        if kind == "new":
            layout = draw(st.sampled_from(LAYOUTS if "layouts" in features else ["contig"]))
            if layout == "contig":
                shape = draw(st.lists(st.integers(low, 4), max_size=3))
            elif layout == "transposed":
                shape = draw(st.lists(st.integers(low, 5), min_size=2, max_size=2))
            elif layout == "channels_last":
                shape = draw(st.lists(st.integers(low, 3), min_size=4, max_size=4))
            else:
                shape = draw(st.lists(st.integers(low, 4), min_size=1, max_size=3))
            dtype = draw(st.sampled_from(dtypes if forced or "integer" not in features else dtypes + [INT]))
            frozen = dtype == INT or (not forced and "frozen" in features and draw(st.booleans()))
            params.append(dict(kind="new", layout=layout, shape=shape, dtype=dtype, frozen=frozen))
            continue
        j = draw(st.sampled_from(sources))
        src = params[j]
        if kind == "dup":  # the same Parameter object again
            params.append(dict(kind="dup", of=j, shape=src["shape"], dtype=src["dtype"], frozen=src["frozen"]))
            continue
        hows = ["full"] + (["rows"] if len(src["shape"]) >= 1 and src["shape"][0] >= 1 else []) \
            + (["cols"] if len(src["shape"]) >= 2 and src["shape"][1] >= 1 else [])
        how = draw(st.sampled_from(hows))
        # a new Parameter on (part of) another's memory; it shares the source's frozen flag
        params.append(dict(kind="view", of=j, how=how, shape=_view_shape(src["shape"], how), dtype=src["dtype"],
                           frozen=src["frozen"]))
    buffers = None
    if cfg["buffers"] and "buffers" in features and draw(st.booleans()):
        buffer_dtypes = [d for d in dtypes if d in FLOATS] + [INT]
        buffers = draw(st.lists(st.tuples(st.lists(st.integers(low, 4), max_size=3), st.sampled_from(buffer_dtypes)),
                                min_size=1, max_size=3))
    cap_mb = draw(st.floats(min_value=1e-6, max_value=25.0) if "small_buckets" in features else st.just(25.0))
    return dict(params=params, buffers=buffers, cap_mb=cap_mb, seed=draw(st.integers(0, 2 ** 16)))


# -- building and running on the ranks ----------------------------------------------------------

def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _values(shape, dtype: torch.dtype, gen: torch.Generator, scale: float) -> torch.Tensor:
    numel = math.prod(shape)
    if dtype == torch.int64:
        return torch.randint(-50, 50, (numel,), generator=gen).reshape(shape)
    if dtype.is_complex:
        re, im = torch.randn(numel, generator=gen, dtype=torch.float64), torch.randn(numel, generator=gen,
                                                                                      dtype=torch.float64)
        return (torch.complex(re, im) * scale).reshape(shape).to(dtype)
    return (torch.randn(numel, generator=gen, dtype=torch.float64) * scale).reshape(shape).to(dtype)


def _gen(spec, rank: int, index: int, phase: int) -> torch.Generator:
    return torch.Generator().manual_seed(spec["seed"] * 1_000_003 + rank * 10_007 + index * 101 + phase * 7)


def _view(t: torch.Tensor, how: str) -> torch.Tensor:
    if how == "rows":
        return t[: (t.shape[0] + 1) // 2]
    if how == "cols":
        return t[:, : (t.shape[1] + 1) // 2]
    return t[...]


def _layout(values: torch.Tensor, layout: str) -> torch.Tensor:
    """``values`` (contiguous, the parameter's shape) laid out as ``layout``, values kept."""
    if layout == "transposed":
        return values.t().contiguous().t()  # dense, not contiguous
    if layout == "channels_last":
        return values.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # a strided slice of a bigger tensor: not dense
        base = torch.zeros(*values.shape[:-1], 2 * values.shape[-1], dtype=values.dtype)
        base[..., ::2] = values
        return base[..., ::2]
    return values


def _build(spec, rank: int) -> tuple[list[nn.Parameter], nn.Module | None]:
    params: list[nn.Parameter] = []
    scale = 1.0 + rank  # replicas differ in values and in magnitude
    for i, p in enumerate(spec["params"]):
        if p["kind"] == "new":
            t = _layout(_values(p["shape"], _dtype(p["dtype"]), _gen(spec, rank, i, 0), scale), p["layout"])
            params.append(nn.Parameter(t, requires_grad=not p["frozen"]))
        elif p["kind"] == "dup":
            params.append(params[p["of"]])
        else:
            params.append(nn.Parameter(_view(params[p["of"]].data, p["how"]), requires_grad=not p["frozen"]))
    module = None
    if spec["buffers"] is not None:
        module = nn.Module()
        for j, (shape, dtype) in enumerate(spec["buffers"]):
            module.register_buffer(f"b{j}", _values(shape, _dtype(dtype), _gen(spec, rank, 100 + j, 0), scale))
    return params, module


@torch.no_grad()
def _overwrite(spec, rank: int, params, module) -> None:
    """New rank-dependent values, in place, for every parameter that owns its memory (and every buffer)."""
    for i, (p, s) in enumerate(zip(params, spec["params"])):
        if s["kind"] == "new":
            p.data.copy_(_values(s["shape"], p.dtype, _gen(spec, rank, i, 1), 1.0 + rank))
    if module is not None:
        for j, (_, b) in enumerate(module.named_buffers()):
            b.copy_(_values(list(b.shape), b.dtype, _gen(spec, rank, 100 + j, 1), 1.0 + rank))


def _grad_weights(spec, rank: int, params) -> dict[int, torch.Tensor]:
    """Per trainable Parameter object (by position of its first listing): d loss / d p."""
    out = {}
    seen: set[int] = set()
    for i, p in enumerate(params):
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        real = torch.float32 if p.is_complex() else p.dtype
        out[i] = _values(list(p.shape), real, _gen(spec, rank, i, 2), 1.0 + rank)
    return out


def _backward(params, weights: dict[int, torch.Tensor]) -> None:
    for i, w in weights.items():
        p = params[i]
        ((p * w).real if p.is_complex() else p * w).sum().backward()


def _snap(tensors) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


def _momentum(opt_state, params) -> list[torch.Tensor | None]:
    out = []
    for p in params:
        buf = opt_state.get(p, {}).get("momentum_buffer")
        out.append(None if buf is None else buf.detach().clone())
    return out


def run_strategy(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """On each rank: build the spec, run ``name``'s round, return every tensor before and after."""
    from localsgd_optim import LocalSGDOptimizer

    rank = dist.get_rank()
    cfg = STRATEGIES[name]
    momentum = cfg.get("momentum", 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate parameters, k=1
        params, module = _build(spec, rank)
        buffers = (lambda: [b for _, b in module.named_buffers()]) if module is not None else (lambda: [])
        out: dict[str, Any] = {"pre": _snap(params), "pre_buffers": _snap(buffers()), "refused": None}
        try:
            opt = LocalSGDOptimizer(torch.optim.SGD(params, lr=0.0, momentum=momentum),
                                    bucket_cap_mb=spec["cap_mb"], buffers=module, **_kwargs(name))
        except (ValueError, TypeError) as e:
            out["refused"] = ("constructor", type(e).__name__, str(e))
            return out
        out["post"] = _snap(params)
        if cfg["sync"]:  # sync_on_init made the replicas equal: make them differ again
            _overwrite(spec, rank, params, module)
        out["start"], out["start_buffers"] = _snap(params), _snap(buffers())
        if momentum:
            weights = _grad_weights(spec, rank, params)
            twin, _ = _build(spec, rank)  # same values: a plain SGD's state is what the round sees
            twin_sgd = torch.optim.SGD(twin, lr=0.0, momentum=momentum)
            _backward(twin, weights)
            twin_sgd.step()
            out["momentum_start"] = _momentum(twin_sgd.state, twin)
            _backward(params, weights)
        try:
            for _ in range(cfg["steps"]):
                opt.step()
        except (ValueError, TypeError) as e:
            out["refused"] = ("step", type(e).__name__, str(e))
            return out
        out["final"], out["final_buffers"] = _snap(params), _snap(buffers())
        if momentum:
            out["momentum_final"] = _momentum(opt.state, params)
    return out


# -- the oracles (pytest process) ---------------------------------------------------------------

def _mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a + b) / 2


def _outer_new(g: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    m = ((g - x0) + (g - x1)) / 2
    return g.add(m, alpha=-1.0)  # SGD(lr=1.0): param.add_(grad, alpha=-lr)


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def _amax(t: torch.Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0


def _approx(name, g, x0, x1) -> tuple[torch.Tensor, float]:
    """The compressed strategies' expectation (float64, exact mean) and its tolerance."""
    g64, d0, d1 = g.double(), (g.double() - x0.double()), (g.double() - x1.double())
    expected = g64 - (d0 + d1) / 2
    if STRATEGIES[name]["oracle"] == "bf16":
        wire = 2.0 ** -7 * (_amax(d0) + _amax(d1))
    else:
        wire = (_amax(d0) + _amax(d1)) / 127 / 2
    return expected, wire + 4 * _eps(g.dtype) * (_amax(g64) + _amax(x0.double()) + _amax(x1.double()))


def _expected(name: str, spec, res) -> list[tuple[Any, ...]]:
    """Per parameter: ("exact", value per rank) or ("close", value, tolerance); aliases from their source."""
    oracle = STRATEGIES[name]["oracle"]
    out: list[tuple[Any, ...]] = []
    for i, p in enumerate(spec["params"]):
        if p["kind"] == "dup":
            out.append(out[p["of"]])
            continue
        if p["kind"] == "view":
            src = out[p["of"]]
            if src[0] == "exact":
                out.append(("exact", [_view(v, p["how"]) for v in src[1]]))
            else:
                out.append(("close", _view(src[1], p["how"]), src[2]))
            continue
        x0, x1 = res[0]["start"][i], res[1]["start"][i]
        if p["frozen"] or p["dtype"] == INT:
            out.append(("exact", [x0, x1]))  # never changed by a round
        elif oracle == "mean":
            out.append(("exact", [_mean(x0, x1)] * 2))
        elif oracle == "outer":
            out.append(("exact", [_outer_new(res[0]["post"][i], x0, x1)] * 2))
        elif oracle == "overlap":
            new = _outer_new(res[0]["post"][i], x0, x1)
            out.append(("exact", [torch.lerp(x0, new, 0.5), torch.lerp(x1, new, 0.5)]))
        else:
            out.append(("close",) + _approx(oracle, res[0]["post"][i], x0, x1))
    return out


def _refusal_ok(name: str, refused) -> bool:
    _where, kind, message = refused
    return kind in ("ValueError", "TypeError") and bool(message.strip()) and any(
        word in message for word in COMMON_MENTIONS + MENTIONS[name])


def check_example(name: str, spec, res) -> bool:
    """Assert the intended semantics for one example; ``False`` when it was (cleanly) refused."""
    what = f"strategy {name!r}, spec {spec!r}"
    if res[0]["refused"] or res[1]["refused"]:
        assert res[0]["refused"] == res[1]["refused"], (
            f"{what}: the ranks disagree: {res[0]['refused']} vs {res[1]['refused']}")
        assert _refusal_ok(name, res[0]["refused"]), (
            f"{what}: refused without a clear ValueError/TypeError naming the argument or parameter: "
            f"{res[0]['refused']}")
        return False
    cfg = STRATEGIES[name]
    for i, p in enumerate(spec["params"]):
        trainable = not p["frozen"] and p["dtype"] != INT
        for r in range(2):
            if not cfg["sync"]:
                assert torch.equal(res[r]["post"][i], res[r]["pre"][i]), (
                    f"{what}: rank {r} parameter {i} changed at construction without sync_on_init:\n"
                    f"before {res[r]['pre'][i]}\nafter {res[r]['post'][i]}")
            elif trainable:
                assert torch.equal(res[r]["post"][i], res[0]["pre"][i]), (
                    f"{what}: rank {r} parameter {i} is not rank 0's value after the sync_on_init broadcast:\n"
                    f"rank 0 had {res[0]['pre'][i]}\ngot {res[r]['post'][i]}")
    for i, (p, exp) in enumerate(zip(spec["params"], _expected(name, spec, res))):
        role = "frozen" if p["frozen"] else p["kind"]
        for r in range(2):
            got = res[r]["final"][i]
            if exp[0] == "exact":
                assert got.dtype == exp[1][r].dtype and torch.equal(got, exp[1][r]), (
                    f"{what}: rank {r} parameter {i} ({role}, {p['dtype']}{p['shape']}) is not the oracle's:\n"
                    f"expected {exp[1][r]}\ngot      {got}\nstart    {res[r]['start'][i]}")
            else:
                err = (got.double() - exp[1]).abs().max().item() if got.numel() else 0.0
                assert got.dtype == _dtype(p["dtype"]) and err <= exp[2], (
                    f"{what}: rank {r} parameter {i} ({role}, {p['dtype']}{p['shape']}) is off by {err} "
                    f"> tolerance {exp[2]}:\nexpected {exp[1]}\ngot      {got}")
        if exp[0] == "close":  # a blocking round leaves identical replicas
            assert torch.equal(res[0]["final"][i], res[1]["final"][i]), (
                f"{what}: parameter {i} differs across ranks after the round:\n"
                f"{res[0]['final'][i]}\n{res[1]['final'][i]}")
    for j, (shape, dtype) in enumerate(spec["buffers"] or []):
        b0, b1 = res[0]["start_buffers"][j], res[1]["start_buffers"][j]
        expected = [b0, b1] if dtype == INT else [_mean(b0, b1)] * 2
        for r in range(2):
            assert torch.equal(res[r]["final_buffers"][j], expected[r]), (
                f"{what}: rank {r} buffer {j} ({dtype}{shape}) is not "
                f"{'left alone' if dtype == INT else 'the plain mean'}:\n"
                f"expected {expected[r]}\ngot      {res[r]['final_buffers'][j]}")
    if "momentum_start" in res[0]:
        for i in range(len(spec["params"])):
            b0, b1 = res[0]["momentum_start"][i], res[1]["momentum_start"][i]
            for r in range(2):
                got = res[r]["momentum_final"][i]
                if b0 is None:
                    assert got is None, f"{what}: rank {r} parameter {i} has a momentum buffer, a plain SGD has none"
                    continue
                assert got is not None and torch.equal(got, _mean(b0, b1)), (
                    f"{what}: rank {r} momentum buffer of parameter {i} is not the mean:\n"
                    f"expected {_mean(b0, b1)}\ngot      {got}")
    return True


# -- the tests ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(STRATEGIES))
def test_round_strategy_matches_per_parameter_oracle(ranks2, name):
    counts = {"accepted": 0, "refused": 0}
    refusals: list[Any] = []

    @settings(max_examples=25, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(spec=specs(name))
    def prop(spec):
        if check_example(name, spec, ranks2(run_strategy, name, spec)):
            counts["accepted"] += 1
        else:
            counts["refused"] += 1
            refusals.append(spec)

    prop()
    assert counts["accepted"], f"strategy {name!r} refused every example ({counts}), e.g. {refusals[:1]}"
