"""torch.distributed.checkpoint (DCP) for Local SGD: every rank's own state, saved and loaded exactly.

Two things stop DCP's own helpers from checkpointing a Local SGD run exactly:

- ``get_optimizer_state_dict`` keeps only ``"state"`` and ``"param_groups"``, so the
  optimizer's ``"local_sgd"`` entry (step count, outer state) is dropped;
- DCP treats a plain tensor saved under the same key on every rank as replicated and writes
  one copy. With Local SGD each rank's inner optimizer state (Adam moments) is its own, and
  mid-period so are its weights: a reload would give every rank rank 0's.

:func:`get_state_dict` builds each rank's state under its own key (``"rank<r>"``), with
model and inner-optimizer entries made by DCP's helpers (FQN-keyed) and the Local SGD entry
beside them; :func:`set_state_dict` loads it back. The usual DCP pattern::

    from localsgd_optim import checkpoint as lsgd_ckpt
    import torch.distributed.checkpoint as dcp

    dcp.save({"train": lsgd_ckpt.get_state_dict(model, opt)}, checkpoint_id=path)
    ...
    state = {"train": lsgd_ckpt.get_state_dict(model, opt)}  # the template DCP loads into
    dcp.load(state, checkpoint_id=path)
    lsgd_ckpt.set_state_dict(model, opt, state["train"])

A checkpoint holds ``world_size`` copies of weights and optimizer state, keyed by global
rank; it reloads at the same world size. A smaller world raises a ``ValueError`` on every
rank in :func:`set_state_dict`; a larger one fails earlier, in ``dcp.load``, with DCP's
"Missing key in checkpoint state_dict: train.rank<r>...". The Local SGD entry (with any
outer-optimizer state) is one serialized blob per rank: DCP loads only the keys its template
has, and the outer optimizer's state only exists after its first step.

To resume at another world size (a host gone for good), :func:`consolidate` turns every rank's
own checkpoint into one state that loads on any number of ranks.
"""

from __future__ import annotations

import io
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ._dist import on_every_rank
from ._state import STATE_KEY
from .optimizer import LocalSGDOptimizer

__all__ = ["get_state_dict", "set_state_dict", "rank_state", "load_rank_state", "consolidate", "load_per_rank"]


def rank_state(model: nn.Module, optimizer: LocalSGDOptimizer) -> dict[str, Any]:
    """This rank's own state, in plain tensors and Python values: ``torch.save`` it, or :func:`consolidate` it.

    ``{"model": ..., "optimizer": ..., "local_sgd": ...}``: the weights and the inner optimizer's
    state keyed by parameter name (DCP's ``get_model_state_dict`` / ``get_optimizer_state_dict``),
    with a sharded model's DTensors (FSDP2, tensor parallel) as this rank's local shards; and the
    Local SGD entry (step count, outer state, residuals: local shards too). Load it back with
    :func:`load_rank_state`, on a model sharded the same way.
    """
    _rank_and_world(optimizer)
    _refuse_fsdp1(optimizer)
    return {
        "model": _local_shards(get_model_state_dict(model)),
        "optimizer": _local_shards(get_optimizer_state_dict(model, optimizer.optimizer)),
        STATE_KEY: optimizer.state_dict()[STATE_KEY],
        SHARDING_KEY: optimizer._members.sharding_identity(),
    }


def load_rank_state(model: nn.Module, optimizer: LocalSGDOptimizer, state: dict[str, Any]) -> None:
    """Load what :func:`rank_state` made (or a :func:`consolidate` of several ranks' ones).

    The Local SGD entry is validated first; nothing changes if it does not fit. Local shards are
    wrapped back as the model's DTensors are now (same placements and mesh). A collective when
    distributed: every rank checks that the state holds the shards it holds (as
    :func:`rank_state` recorded them), and if one does not, every rank raises a ``ValueError``
    before anything is loaded.
    """
    _rank_and_world(optimizer)
    _refuse_fsdp1(optimizer)
    _check_same_shards(optimizer, state.get(SHARDING_KEY))

    def load_model_and_inner() -> None:  # after the entry is validated: nothing changes on a bad one
        set_model_state_dict(model, _as_live(state["model"], get_model_state_dict(model)))
        set_optimizer_state_dict(model, optimizer.optimizer, _as_live(
            state["optimizer"], get_optimizer_state_dict(model, optimizer.optimizer)))

    optimizer.load_local_sgd_entry(state.get(STATE_KEY), load_model_and_inner)


def get_state_dict(model: nn.Module, optimizer: LocalSGDOptimizer) -> dict[str, Any]:
    """This rank's weights, inner optimizer state and Local SGD state, keyed by its rank, for DCP.

    A sharded model's DTensors (FSDP2, tensor parallel) are saved as this rank's local shards:
    under its own key, a DTensor would be one rank's part of a global tensor the other ranks
    never write, which DCP refuses. :func:`set_state_dict` wraps them back.
    """
    rank, world = _rank_and_world(optimizer)
    mine = rank_state(model, optimizer)
    mine[SHARDING_KEY] = _to_bytes(mine[SHARDING_KEY])
    # One blob: DCP loads only the keys a template has; outer state appears after a round.
    mine[STATE_KEY] = _to_bytes(mine[STATE_KEY])
    return {"world_size": world, f"rank{rank}": mine}


def set_state_dict(model: nn.Module, optimizer: LocalSGDOptimizer, state: dict[str, Any]) -> None:
    """Load what :func:`get_state_dict` made (after ``dcp.load`` filled it in)."""
    rank, world = _rank_and_world(optimizer)
    saved_world = state.get("world_size")
    if saved_world != world:  # the same value on every rank, so every rank raises
        raise ValueError(
            f"the checkpoint was saved by {saved_world} ranks, this run has {world}; a Local SGD "
            "checkpoint holds one state per rank: resume at the same world size"
        )
    mine = dict(state[f"rank{rank}"])
    mine[STATE_KEY] = torch.load(io.BytesIO(mine[STATE_KEY]), weights_only=True)
    if isinstance(mine.get(SHARDING_KEY), bytes):
        mine[SHARDING_KEY] = torch.load(io.BytesIO(mine[SHARDING_KEY]), weights_only=True)
    load_rank_state(model, optimizer, mine)


def consolidate(per_rank_states: Sequence[Any]) -> Any:
    """One checkpoint from every rank's own, loadable at any world size.

    ``per_rank_states[r]`` is what rank ``r`` saved, for example
    ``{"model": model.state_dict(), "opt": opt.state_dict()}`` (any nesting of dicts, lists
    and tuples; every rank's must have the same structure). The result has that structure:

    - floating-point tensors that differ between ranks (the weights mid-period, the inner
      optimizer's state such as Adam's moments, int8 error-feedback residuals) become their
      mean: summed in rank order in their own dtype, then divided by the number of ranks, as
      :meth:`LocalSGDOptimizer.sync` averages;
    - everything identical on every rank (the step count, param groups, the outer optimizer's
      global copy and momentum, an in-flight overlapped round's mean) is kept as it is;
    - anything else that differs is rank 0's (per-rank RNG states, for example), except inside
      the ``"local_sgd"`` entry, where the ranks must agree: checkpoints saved at different steps
      raise a ``ValueError`` naming the entry;
    - an inner optimizer's per-parameter ``state`` may exist on some ranks only (a parameter that
      got no gradient there yet: a per-rank task head, a rarely routed expert). Each parameter's
      entry is merged over the ranks that have it (its moments: their mean over those ranks), and
      a rank without one contributes nothing: zeros would shrink Adam's moments toward a state
      no rank had. Elsewhere, states whose keys differ raise a ``ValueError``.

    Load the result on every rank of the new world with ``model.load_state_dict`` and
    ``opt.load_state_dict``: the weights are the average a ``sync()`` at save time would have
    made, the step count (so the schedule's phase) carries on, and each new rank starts from
    the mean optimizer state. A same-size restart should load each rank's own state instead:
    that one resumes bit for bit.

    Example::

        >>> states = [torch.load(f"ckpt/rank{r}.pt", weights_only=True) for r in range(3)]
        >>> state = consolidate(states)  # then, on each of the 2 new ranks:
        >>> model.load_state_dict(state["model"]); opt.load_state_dict(state["opt"])
    """
    if isinstance(per_rank_states, (str, bytes, dict)) or not isinstance(per_rank_states, Sequence):
        raise TypeError(
            f"per_rank_states must be a list with one saved state per rank, got {type(per_rank_states).__name__}; "
            "pass [torch.load(path_of_rank(r)) for r in range(saved_world_size)]"
        )
    if not per_rank_states:
        raise ValueError("per_rank_states is empty: pass one saved state per rank of the run that saved them")
    _check_same_sharding(list(per_rank_states), ())  # first: shards of different places must never mix
    return _merge(list(per_rank_states), ())


def _check_same_sharding(values: list[Any], path: tuple[Any, ...]) -> None:
    """Raise if the states' :func:`rank_state` shard records (wherever they are nested) differ."""
    if not all(isinstance(v, dict) for v in values):
        return
    for key in values[0]:
        if not all(key in v for v in values):
            continue
        if key == SHARDING_KEY:
            differ = next((r for r, v in enumerate(values) if not _same(v[key], values[0][key])), None)
            if differ is not None:
                where = ".".join(map(str, path + (key,)))
                raise ValueError(
                    f"consolidate: the states passed as ranks 0 and {differ} hold different shards of the model "
                    f"({where}); average only the ranks that held the same shard: "
                    "checkpoint.load_per_rank(path_of, rank, world, shards=S), or pass consolidate one shard's replicas"
                )
        else:
            _check_same_sharding([v[key] for v in values], path + (key,))


def load_per_rank(path_of: Any, rank: int, world: int, shards: int = 1,
                  saved_world: int | None = None) -> tuple[Any, int]:
    """This rank's own saved state, or, when another number of ranks saved them, their consolidation.

    ``path_of(r)`` is rank ``r``'s file; each holds a ``"world_size"`` entry (the number of ranks
    that saved). Each file is read at most once. Pass ``saved_world`` when it is known (it is in an
    :class:`~localsgd_optim.elastic.ElasticCheckpoint` step's name): a same-size resume then reads
    only this rank's own file. Without it, rank 0's file is read first to learn it.
    With sharded replicas of ``shards`` ranks each, laid out as ``init_device_mesh((replicas,
    shards))`` numbers them (global rank ``replica * shards + shard``), only the saved ranks
    that held this rank's shard are consolidated: the number of replicas may change, the
    sharding may not. Returns ``(state, saved_world_size)``.
    """
    loaded: dict[int, Any] = {}

    def load(r: int) -> Any:
        if r not in loaded:
            loaded[r] = torch.load(path_of(r), map_location="cpu", weights_only=True)
        return loaded[r]

    # any file names the saved world size; this rank's own exists unless the world grew
    if not (isinstance(shards, int) and shards >= 1 and world % shards == 0):
        raise ValueError(f"shards must be an integer >= 1 dividing the world size {world}, got {shards!r}")
    # Rank 0's file names the saved world: every run writes it. This rank's own may be stale (left
    # by an earlier, larger world), so it is read only when the world size is unchanged.
    if saved_world is None:
        saved_world = load(0).get("world_size", world)
    if saved_world == world:
        return load(rank), world
    if saved_world % shards:
        raise ValueError(
            f"the checkpoint was saved by {saved_world} ranks, which is not a whole number of replicas of "
            f"{shards} shards: resume with the sharding it was saved with (shards must divide {saved_world})"
        )
    mine = rank % shards
    return consolidate([load(r) for r in range(mine, saved_world, shards)]), saved_world


def _merge(values: list[Any], path: tuple[Any, ...]) -> Any:
    first = values[0]
    where = ".".join(map(str, path)) or "the state"
    if all(isinstance(v, dict) for v in values):
        for r, v in enumerate(values[1:], 1):
            if v.keys() != first.keys():
                raise ValueError(
                    f"consolidate: rank {r}'s {where} has keys {sorted(map(str, v))} but rank 0's has "
                    f"{sorted(map(str, first))}; pass states saved by the same run at the same step"
                )
        if path and path[-1] == STATE_KEY and "rounds" in first:  # round_every_s: step counts differ by
            values = [_at_rank0_step(v, first) for v in values]  # design; rank 0's, rounds agree
        optimizer = "param_groups" in first and STATE_KEY not in path  # a torch optimizer's state dict
        return {key: (_merge_per_parameter if optimizer and key == "state" else _merge)(
            [v[key] for v in values], path + (key,)) for key in first
            if not (STATE_KEY in path and key in DROPPED_KEYS)}
    if all(isinstance(v, (list, tuple)) for v in values) and len({len(v) for v in values}) == 1:
        merged = [_merge([v[i] for v in values], path + (i,)) for i in range(len(first))]
        if isinstance(first, list) or type(first) is tuple:
            return type(first)(merged)
        return type(first)(*merged) if hasattr(first, "_fields") else type(first)(merged)  # namedtuple
    if all(_same(v, first) for v in values[1:]):
        return first

    # per-rank only in the Local SGD entry: error feedback (averaged on a resize, like the parameters)
    shared = STATE_KEY in path and not (PER_RANK_KEYS | _RANK0_KEYS).intersection(map(str, path))
    if not shared and all(isinstance(v, torch.Tensor) for v in values) and (
        first.is_floating_point() or first.is_complex()
    ) and all(v.dtype == first.dtype and v.shape == first.shape for v in values):
        total = first.detach().clone()
        for v in values[1:]:
            total.add_(v.to(total.device))
        return total.div_(len(values))
    if shared:
        differ = next(r for r, v in enumerate(values) if not _same(v, first))
        raise ValueError(
            f"consolidate: ranks 0 and {differ} disagree on {where} ({_short(first)} vs "
            f"{_short(values[differ])}); every rank's Local SGD entry must come from the same step of "
            "the same run: pass the checkpoints every rank saved at one step"
        )
    return first  # differs per rank but cannot be averaged (an RNG state): rank 0's


def _at_rank0_step(entry: dict[str, Any], rank0: dict[str, Any]) -> dict[str, Any]:
    """A time-budgeted rank's Local SGD entry counted in rank 0's steps: its step count, and the landing
    step of its round in flight (asynchronous rounds), which counts this rank's own steps."""
    entry = {**entry, "num_steps": rank0["num_steps"]}
    flight, flight0 = entry.get("in_flight"), rank0.get("in_flight")
    if isinstance(flight, dict) and isinstance(flight0, dict) and "apply_at" in flight0:
        entry["in_flight"] = {**flight, "apply_at": flight0["apply_at"]}
    return entry


def _merge_per_parameter(values: list[Any], path: tuple[Any, ...]) -> Any:
    """An optimizer's per-parameter ``state``: each parameter's entry merged over the ranks that have one.

    A parameter that got no gradient on a rank yet (a per-rank task head, a rarely routed expert)
    has no state there; that rank contributes nothing to it.
    """
    if not all(isinstance(v, dict) for v in values):
        return _merge(values, path)
    keys = list(dict.fromkeys(k for v in values for k in v))
    return {key: _merge([v[key] for v in values if key in v], path + (key,)) for key in keys}


#: keys of the Local SGD entry that differ per rank by design: the error-feedback residuals
PER_RANK_KEYS = frozenset({"int8_residuals", "ef_residuals"})
#: and that :func:`consolidate` drops: each rank's residual of the mean shard it owns in a reduce-scatter
#: round (other ranks own other shards; the new world's second stage starts from zero)
DROPPED_KEYS = frozenset({"ef_shard_residuals"})
#: and, where :func:`consolidate` keeps rank 0's: the work of the period (``step(tokens=)``) and the time
#: spent in it (``round_every_s``)
_RANK0_KEYS = frozenset({"tokens_since_round", "period_spent_s"})


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a.detach().cpu(), b.detach().cpu()))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - an object without a boolean equality: treat as different
        return False


def _short(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}" if value.numel() > 1 else repr(value.item())
    return f"{value!r:.80}"


#: Key of :func:`rank_state`'s record of which shard each sharded parameter is (empty: unsharded).
SHARDING_KEY = "local_sgd_sharding"


def _refuse_fsdp1(optimizer: LocalSGDOptimizer) -> None:
    sharding = optimizer._members.sharding
    if sharding is not None and sharding.has_fsdp1:
        raise TypeError(
            "localsgd_optim.checkpoint does not support FSDP1 models yet (torch 2.13's FSDP1 state dicts over a "
            "subgroup fail on some ranks only); save each rank's opt.state_dict() and its FlatParameters with "
            "torch.save, or shard with FSDP2 (fully_shard)"
        )


def _check_same_shards(optimizer: LocalSGDOptimizer, saved: Any) -> None:
    """Raise on every rank unless every rank's ``saved`` shard record is the shards it holds now."""
    mine = optimizer._members.sharding_identity()
    problem = None
    if saved is not None and list(map(tuple, saved)) != mine:
        first = next((i for i, (a, b) in enumerate(zip(saved, mine)) if tuple(a) != b), min(len(saved), len(mine)))
        problem = (f"{mine[first][0] if first < len(mine) else 'a parameter'}: the state holds shard "
                   f"{tuple(saved[first])[1] if first < len(saved) else 'none'}, this rank holds "
                   f"{mine[first][1] if first < len(mine) else 'none'}")
    fits = problem is None
    if dist.is_initialized() and dist.get_world_size() > 1:
        fits = on_every_rank(fits, None, optimizer.join_device)
    if not fits:
        raise ValueError(
            "load_rank_state: " + (problem or "another rank was given a state of shards it does not hold") +
            ". Each rank must load a state of the shards it holds: consolidate only the saved ranks that held "
            "the same shard (checkpoint.load_per_rank(path_of, rank, world, shards=S)), and keep the sharding"
        )


def map_tensors(tree: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``tree`` (nested dicts, lists and tuples) with ``fn`` applied to every tensor in it."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: map_tensors(v, fn) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(map_tensors(v, fn) for v in tree)
    return tree


def _local_shards(tree: Any) -> Any:
    """``tree`` with every DTensor replaced by its local shard (a view: DCP loads into it in place)."""
    return map_tensors(tree, lambda t: t.to_local() if isinstance(t, DTensor) else t)


def _as_live(loaded: Any, live: Any) -> Any:
    """``loaded`` (from :func:`_local_shards`) with each local shard wrapped back as the DTensor ``live`` has there."""
    if isinstance(live, DTensor) and isinstance(loaded, torch.Tensor) and not isinstance(loaded, DTensor):
        return DTensor.from_local(loaded, live.device_mesh, live.placements, run_check=False, shape=live.shape,
                                  stride=live.stride())
    if isinstance(loaded, dict) and isinstance(live, dict):
        return {k: _as_live(v, live[k]) if k in live else v for k, v in loaded.items()}
    if isinstance(loaded, (list, tuple)) and isinstance(live, (list, tuple)) and len(loaded) == len(live):
        return type(loaded)(_as_live(a, b) for a, b in zip(loaded, live))
    return loaded


def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _rank_and_world(optimizer: LocalSGDOptimizer) -> tuple[int, int]:
    if not isinstance(optimizer, LocalSGDOptimizer):
        raise TypeError(f"optimizer must be a LocalSGDOptimizer, got {type(optimizer).__name__}")
    if not dist.is_initialized():
        return 0, 1
    # Global ranks: with subgroups, two processes share a group rank and DCP would keep one.
    return dist.get_rank(), dist.get_world_size()
