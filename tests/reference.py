"""The test oracle: Local SGD written for clarity, one parameter and one collective at a time.

Nothing here is shared with the library: no buckets, no flattening, no async.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from helpers import make_batches, make_model, mse, params_of


def _src(group) -> int:
    return 0 if group is None else dist.get_global_rank(group, 0)


@torch.no_grad()
def average_one_by_one(params, group=None) -> None:
    world = dist.get_world_size(group)
    for p in params:
        dist.all_reduce(p, op=dist.ReduceOp.SUM, group=group)
        p.div_(world)


@torch.no_grad()
def broadcast_one_by_one(params, src=None, group=None) -> None:
    for p in params:
        dist.broadcast(p, _src(group) if src is None else src, group=group)


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


def reference_rounds(model, inner, batches, rounds, tensors=None, group=None, state=False):
    """Plain loop: step on every batch; average the given tensors one by one after the listed steps
    (over ``group``; with ``state``, also the inner optimizer's per-parameter state ``state(inner)``)."""
    tensors = tensors if tensors is not None else list(model.parameters())
    broadcast_one_by_one(tensors, group=group)
    for step, (x, y) in enumerate(batches, start=1):
        inner.zero_grad()
        mse(model(x), y).backward()
        inner.step()
        if step in rounds:
            average_one_by_one(tensors, group)
            if state:
                average_one_by_one(state(inner), group)


def reference_diloco(model, inner, batches, k, outer_factory, warmup=0, wire=None, params=None, group=None):
    """Plain loop: global copy; every k steps average (global - local) parameter by parameter,
    step the outer optimizer with it as .grad, write the global copy into the model.

    ``params``: the tensors averaged (default: the model's parameters; a sharded model's local
    shards), over ``group``."""
    params = list(model.parameters()) if params is None else params
    broadcast_one_by_one(params, group=group)
    world = dist.get_world_size(group)
    global_copy = [p.detach().clone() for p in params]
    outer = outer_factory(global_copy)
    for step, (x, y) in enumerate(batches, start=1):
        inner.zero_grad()
        mse(model(x), y).backward()
        inner.step()
        with torch.no_grad():
            if step <= warmup:
                for p in params:
                    dist.all_reduce(p, group=group)
                    p.div_(world)
                if step == warmup:
                    for g, p in zip(global_copy, params):
                        g.copy_(p)
            elif (step - warmup) % k == 0:
                for g, p in zip(global_copy, params):
                    delta = (g - p) if wire is None else (g - p).to(wire)  # compressed on the wire
                    dist.all_reduce(delta, group=group)
                    g.grad = delta.to(g.dtype) / world  # widened, then divided at full precision
                outer.step()
                for g, p in zip(global_copy, params):
                    g.grad = None
                    p.copy_(g)


def weighing(weights, rank):
    """The rule of a weighted round (``step(tokens=)``), from every rank's total: (this rank's multiplier,
    the divisor). A rank whose total is 0 sends nothing (multiplier 0); if the others' totals are
    equal, the round is the plain mean over them (multiplier ``None``); if every total is 0, the plain
    mean over all; otherwise each sends ``w_r * x_r`` and the sum is divided by ``sum(w_r)``."""
    if not any(weights):
        weights = [1] * len(weights)
    sending = [w for w in weights if w > 0]
    mine = weights[rank]
    if len(set(sending)) == 1:
        return (None if mine else 0), len(sending)
    return mine, sum(sending)


def reference_error_feedback(model, inner, batches, k, outer_factory, exchange, feedback=1.0, params=None,
                             group=None, weights=None, requantize=None):
    """Plain loop of a compressed outer round with error feedback: per parameter, one at a time,
    v = (global - local) + feedback x residual; ``exchange(v, world, group)`` returns what this rank
    sent (decoded) and the sum over ranks, in rank order; the residual keeps v - sent; the mean
    steps the global copy. Returns the residuals.

    ``weights`` (every rank's total, one list per round; see :func:`weighing`) weight the means: a
    rank with multiplier w exchanges ``u = w * v`` and keeps ``(u - sent) / w``; one whose total is 0
    exchanges zeros and keeps its residual; the sum is divided by the total weight.

    ``requantize(i, mean)`` (a reduce-scatter round's second stage), if given, returns what the mean of
    parameter ``i`` becomes."""
    params = list(model.parameters()) if params is None else params
    broadcast_one_by_one(params, group=group)
    world = dist.get_world_size(group)
    mine, divisor = None, world
    global_copy = [p.detach().clone() for p in params]
    residuals = [torch.zeros_like(p) for p in params]
    outer = outer_factory(global_copy)
    for step, (x, y) in enumerate(batches, start=1):
        inner.zero_grad()
        mse(model(x), y).backward()
        inner.step()
        if step % k:
            continue
        if weights is not None:
            mine, divisor = weighing(weights[step // k - 1], dist.get_rank(group))
        with torch.no_grad():
            for i, (g, p, e) in enumerate(zip(global_copy, params, residuals)):
                if mine == 0:  # no work since the last round: sends zeros, keeps its residual
                    _, total = exchange(torch.zeros_like(p), world, group)
                else:
                    v = (g - p) + e if feedback == 1 else (g - p).add_(e, alpha=feedback)
                    u = v if mine is None else v * mine
                    sent, total = exchange(u, world, group)
                    e.copy_(u - sent if mine is None else (u - sent) / mine)
                g.grad = total / divisor if requantize is None else requantize(i, total / divisor)
            outer.step()
            for g, p in zip(global_copy, params):
                g.grad = None
                p.copy_(g)
    return residuals


def _int8_exchange(v, world, group):
    """Per-tensor scale max|v|/127; int8 codes and scales all-gathered, dequantized, summed."""
    scale = v.abs().max().clamp_min(torch.finfo(torch.float32).tiny) / 127
    q = torch.round(v / scale).clamp(-127, 127)
    codes = [torch.empty_like(q, dtype=torch.int8) for _ in range(world)]
    scales = [torch.empty(1) for _ in range(world)]
    dist.all_gather(codes, q.to(torch.int8), group=group)
    dist.all_gather(scales, scale.reshape(1), group=group)
    total = torch.zeros_like(v)
    for c, s in zip(codes, scales):
        total.add_(c.float() * s)
    return q * scale, total


def reference_int8_diloco(model, inner, batches, k, outer_factory, params=None, group=None):
    """Error feedback through int8 codes with a per-tensor scale (see ``_int8_exchange``)."""
    return reference_error_feedback(model, inner, batches, k, outer_factory, _int8_exchange, params=params,
                                    group=group)


def reference_overlapped(model, inner, batches, k, tau, mix, outer_factory, params=None, group=None):
    """Plain loop: at step r (r % k == 0) snapshot global - local per parameter and all-reduce
    it (blocking: the result is only used later); at r + tau: outer step with the mean, then
    p <- mix * p + (1 - mix) * global."""
    params = list(model.parameters()) if params is None else params
    broadcast_one_by_one(params, group=group)
    world = dist.get_world_size(group)
    global_copy = [p.detach().clone() for p in params]
    outer = outer_factory(global_copy)
    pending = None
    for step, (x, y) in enumerate(batches, start=1):
        inner.zero_grad()
        mse(model(x), y).backward()
        inner.step()
        with torch.no_grad():
            if step % k == 0:
                pending = []
                for g, p in zip(global_copy, params):
                    d = g - p
                    dist.all_reduce(d, group=group)
                    pending.append(d / world)
            if pending is not None and step % k == tau:
                for g, d in zip(global_copy, pending):
                    g.grad = d
                outer.step()
                for g, p in zip(global_copy, params):
                    g.grad = None
                    p.lerp_(g, 1.0 - mix)
                pending = None


def reference_streaming(model, inner, batches, k, fragments, outer_factory=None, tau=0, mix=0.5, counts=None,
                        wire=None, params=None, group=None, weights=None):
    """Plain loop, fragment by fragment: ``fragments`` lists each fragment's parameter indices.

    Fragment i syncs after the steps s with s % k == (k * (i + 1) // P) % k. Without an outer
    optimizer its parameters are averaged one by one. With one: a global copy per parameter and
    an outer optimizer per fragment; the mean of (global - local) steps it, then the fragment's
    parameters become the global copy; or, with ``tau``, the mean is taken at the sync and
    applied tau steps later as p <- mix * p + (1 - mix) * global. With ``counts`` (uneven
    inputs under Join), a rank out of batches keeps counting and sends zeros, and each mean
    divides by the ranks still training. With ``weights`` (every rank's total at each fragment's
    round, the same at every round), an outer round's means are weighted (:func:`weighing`).
    """
    params = list(model.parameters()) if params is None else params
    broadcast_one_by_one(params, group=group)
    world, n = dist.get_world_size(group), len(fragments)
    phase_of = {(k * (i + 1) // n) % k: i for i in range(n)}
    global_copy = [p.detach().clone() for p in params]
    outers = [outer_factory([global_copy[j] for j in idx]) for idx in fragments] if outer_factory else None
    pending = None  # (fragment, step to apply at, mean deltas)
    steps = len(batches) if counts is None else max(counts)
    for step in range(1, steps + 1):
        training = step <= len(batches)
        if training:
            x, y = batches[step - 1]
            inner.zero_grad()
            mse(model(x), y).backward()
            inner.step()
        active = world if counts is None else sum(1 for c in counts if c >= step)
        with torch.no_grad():
            if pending is not None and step == pending[1]:
                i, _, means = pending
                for j, d in zip(fragments[i], means):
                    global_copy[j].grad = d
                outers[i].step()
                for j in fragments[i]:
                    global_copy[j].grad = None
                    params[j].lerp_(global_copy[j], 1.0 - mix)
                pending = None
            i = phase_of.get(step % k)
            if i is None:
                continue
            if outers is None:
                for j in fragments[i]:
                    t = params[j] if training else torch.zeros_like(params[j])
                    dist.all_reduce(t, group=group)
                    params[j].copy_(t / active)
                continue
            means = []
            mine, divisor = (None, active) if weights is None else weighing(weights, dist.get_rank(group))
            for j in fragments[i]:
                d = (global_copy[j] - params[j]) if training and mine != 0 else torch.zeros_like(params[j])
                d = d if mine is None else d * mine
                d = d if wire is None else d.to(wire)
                dist.all_reduce(d, group=group)
                means.append(d.to(params[j].dtype) / divisor)
            if tau:
                pending = (i, step + tau, means)
                continue
            for j, d in zip(fragments[i], means):
                global_copy[j].grad = d
            outers[i].step()
            for j in fragments[i]:
                global_copy[j].grad = None
                params[j].copy_(global_copy[j])


def reference_join(counts, k, rank):
    """Plain loops: after a rank runs out it sends zeros; each round divides by the ranks still training."""
    batches = make_batches(counts[rank])
    model = make_model(seed=0)
    inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    params = list(model.parameters())
    for step in range(1, max(counts) + 1):
        if step <= counts[rank]:
            x, y = batches[step - 1]
            inner.zero_grad()
            mse(model(x), y).backward()
            inner.step()
        if step % k == 0:
            active = sum(1 for c in counts if c >= step)
            with torch.no_grad():
                for p in params:
                    if step > counts[rank]:
                        p.zero_()
                    dist.all_reduce(p)
                    p.div_(active)
    return params_of(model)


def reference_events(period_at, warmup, local_k, overlap_steps, steps):
    """(step, event name) for steps 1..steps, from the definitions, one step at a time.

    Warmup steps each average; after warmup, global rounds fall at ``r_{i+1} = r_i +
    period_at(r_i + 1)`` from ``r_0 = warmup``; an overlapped round lands ``overlap_steps``
    after its launch; hierarchical rounds every ``local_k`` steps after warmup, unless a
    global round (or a landing) takes the step.
    """
    rounds, r = set(), warmup
    while r <= steps:
        r += period_at(r + 1)
        rounds.add(r)
    out = []
    for s in range(1, steps + 1):
        if s <= warmup:
            out.append((s, "WARMUP_ROUND"))
            if s == warmup:
                out.append((s, "WARMUP_END"))
        elif s in rounds:
            out.append((s, "GLOBAL_ROUND"))
        elif overlap_steps and s - overlap_steps in rounds:
            out.append((s, "LAND"))
        elif local_k and (s - warmup) % local_k == 0:
            out.append((s, "LOCAL_ROUND"))
    return out


@torch.no_grad()
def chunked_compress_one_tensor(v, spec):
    """What one rank sends of one tensor: chunk by chunk, top-k by magnitude (``spec.fraction``; of equal
    magnitudes the earliest), then ``spec.bits``-bit uniform codes with a step of STEP_IN_RMS[bits] x the
    kept values' rms.
    Returns the decoded values, dense, zero where nothing is sent."""
    from localsgd_optim.compression import STEP_IN_RMS

    flat = v.reshape(-1)
    sent = torch.zeros_like(flat)
    for start in range(0, flat.numel(), spec.chunk):
        chunk = flat[start:start + spec.chunk]
        kept = spec.per_chunk(chunk.numel())
        # the largest magnitudes, of equal ones the earliest (a stable sort), in order of magnitude
        idx = torch.sort(chunk.abs(), descending=True, stable=True).indices[:kept] if spec.fraction < 1 \
            else torch.arange(chunk.numel())
        vals = chunk[idx]
        if spec.bits is not None:
            half = 2 ** (spec.bits - 1)
            rms = torch.sqrt(vals.double().square().sum() / kept).float()
            step = rms * STEP_IN_RMS[spec.bits]
            codes = torch.floor(vals / step.clamp_min(torch.finfo(torch.float32).tiny)) + half
            vals = (codes.clamp(0, 2 * half - 1) - (half - 0.5)) * step
        sent[start + idx] = vals
    return sent.view_as(v)


def chunked_exchange(spec):
    """The exchange of ``spec``: each rank's ``chunked_compress_one_tensor`` all-gathered, summed in rank order."""
    def exchange(v, world, group):
        sent = chunked_compress_one_tensor(v, spec)
        everyone = [torch.empty_like(sent) for _ in range(world)]
        dist.all_gather(everyone, sent, group=group)
        total = torch.zeros_like(v)
        for s in everyone:
            total.add_(s)
        return sent, total

    return exchange


def all_reduce_exchange(wire=None):
    """The exchange of an uncompressed round (``wire``: the dtype it travels and sums in): what is sent is
    ``v`` itself, the sum is one all-reduce, widened back."""
    def exchange(v, world, group):
        total = v.clone() if wire is None else v.to(wire)
        dist.all_reduce(total, group=group)
        return v, total.to(v.dtype)

    return exchange


def reference_chunked_diloco(model, inner, batches, k, outer_factory, spec, params=None, group=None):
    """Error feedback through ``chunked_compress_one_tensor``: each rank's decoded tensor is
    all-gathered one parameter at a time and summed in rank order."""
    return reference_error_feedback(model, inner, batches, k, outer_factory, chunked_exchange(spec), spec.feedback,
                                    params, group)


def reference_reduce_scatter_diloco(model, inner, batches, k, outer_factory, spec, params=None, group=None,
                                    weights=None):
    """A reduce-scatter round, tensor by tensor: the first stage is the all-gather's (each rank's decoded
    tensor summed in rank order, divided), then the mean is quantized again, chunk by chunk, with a second
    residual ``s``: ``u = mean + feedback * s``, the mean becomes ``Q(u)``, ``s = u - Q(u)``. Every rank
    keeps the whole second residual here (the same on every rank); the engine keeps each shard on its
    owner. Returns (the first residuals, the second)."""
    params = list(model.parameters()) if params is None else params
    second = [torch.zeros_like(p) for p in params]

    def requantize(i, mean):
        u = mean + second[i] if spec.feedback == 1 else mean.add(second[i], alpha=spec.feedback)
        sent = chunked_compress_one_tensor(u, spec)
        second[i] = u - sent
        return sent

    first = reference_error_feedback(model, inner, batches, k, outer_factory, chunked_exchange(spec), spec.feedback,
                                     params, group, weights, requantize)
    return first, second
