"""Sharded parameters: which plain tensor a round averages for each DTensor or FSDP1 parameter.

A replica sharded with FSDP2 (``fully_shard``), tensor parallelism (DTensor) or FSDP1 holds a
*local shard* of each parameter on every rank. Local SGD averages each shard over the ranks
that hold the same shard in other replicas (``mesh.get_group("replicate")``), in place.

**Every touch of FSDP's and DTensor's private attributes lives in this module.** What it reads:

- ``DTensor._local_tensor``: the local shard itself (a plain tensor);
- FSDP2: the registry of composable states (``torch.distributed._composable_state``), each
  :class:`FSDPState`'s ``_fsdp_param_groups`` and their ``FSDPParam``\\ s: ``sharded_param`` (the
  DTensor the optimizer holds), ``_sharded_param_data`` (the padded 1-D shard FSDP all-gathers
  from; ``_local_tensor`` is a narrowed view of it), ``padded_sharded_param_size``,
  ``fsdp_placement``, ``mesh_info`` (native HSDP is refused) and ``offload_to_cpu``;
- FSDP1: ``FlatParameter._local_shard`` (what FSDP1 points the flat parameter back at when it
  reshards), ``_sharded_size`` and ``_shard_param_infos`` (which slice of which parameter this shard holds).

With ``flat_params=True`` the engine moves a shard into its flat storage by re-pointing every
one of these references at the new memory (:meth:`Sharding.move`), so FSDP all-gathers from
the storage a round reduces: zero-copy, one collective per bucket. When an attribute is
missing or has changed shape (another torch), or the shard cannot live in flat storage (FSDP2
CPU offload), that parameter falls back to the copy path: its public local view
(``DTensor.to_local()``) is *staged*, copied into a slot and back each round. Still exact.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ._dist import LocalSGDError

__all__ = ["Sharding", "find_sharding", "named_params", "resolve_group", "FALLBACK_REASON"]

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - torch without DTensor
    DTensor = Replicate = Shard = ()  # type: ignore[assignment,misc]
try:
    from torch.distributed.fsdp._flat_param import FlatParameter
except ImportError:  # pragma: no cover - torch without FSDP1
    FlatParameter = ()  # type: ignore[assignment,misc]

#: Set by tests to force the copy path (what happens when FSDP's private attributes change).
FALLBACK_REASON: str | None = None


def _set_data(t: torch.Tensor, view: torch.Tensor) -> None:
    t.data = view


def resolve_group(process_group: Any) -> Any:
    """``process_group`` as a process group: a 1-D ``DeviceMesh`` (``mesh["replicate"]``) gives its group."""
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # pragma: no cover
        return process_group
    if isinstance(process_group, DeviceMesh):
        if process_group.ndim != 1:
            raise ValueError(
                f"process_group must be a process group or a 1-D DeviceMesh, got a {process_group.ndim}-D mesh "
                f"{process_group.mesh_dim_names}; pass the replicate dimension, e.g. mesh['replicate'] or "
                "mesh.get_group('replicate')"
            )
        return process_group.get_group()
    return process_group


def _fsdp2_params() -> tuple[dict[int, Any], list[nn.Module]]:
    """Every live FSDP2 ``FSDPParam`` by ``id`` of its sharded parameter, and the FSDP2 modules."""
    try:
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    except ImportError:  # pragma: no cover - another torch
        return {}, []
    found: dict[int, Any] = {}
    modules = []
    for module, ref in list(_module_state_mapping.items()):
        state = ref() if callable(ref) else ref
        if not isinstance(state, FSDPState):
            continue
        modules.append(module)
        for group in getattr(state, "_fsdp_param_groups", ()) or ():
            for fsdp_param in getattr(group, "fsdp_params", ()):
                param = getattr(fsdp_param, "sharded_param", None)
                if param is not None:
                    found[id(param)] = fsdp_param
    return found, modules


def _all_reduces_gradients(fsdp_param: Any) -> str | None:
    """``"HSDP"`` or ``"replicate"`` when FSDP2 all-reduces this parameter's gradient across
    replicas at every step (native HSDP, or ``fully_shard``/``replicate`` with replication only)."""
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_common import DDPMeshInfo, HSDPMeshInfo
    except ImportError:  # pragma: no cover
        return None
    info = getattr(fsdp_param, "mesh_info", None)
    if isinstance(info, HSDPMeshInfo):
        return "native HSDP (fully_shard over a 2-D mesh)"
    if isinstance(info, DDPMeshInfo):
        return "FSDP2 replication (a Replicate placement, as torch's replicate() makes)"
    return None


def _ranks(group: Any) -> tuple[int, ...]:
    return tuple(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD))


class _Shard:
    """One sharded parameter: how to find the plain tensor averaged, and how to move it.

    ``kind``: ``"fsdp2"`` (the padded 1-D shard FSDP all-gathers from), ``"dtensor"`` (a
    tensor-parallel DTensor's local tensor), ``"fsdp1"`` (a ``FlatParameter``: already flat) or
    ``"copy"`` (the fallback: a public view, staged every round).
    """

    __slots__ = ("param", "kind", "owner", "why")  # owner: the FSDPParam (fsdp2), the kept view (copy)

    def __init__(self, param: torch.Tensor, kind: str, owner: Any = None, why: str | None = None) -> None:
        self.param, self.kind, self.owner, self.why = param, kind, owner, why

    def tensor(self) -> torch.Tensor:
        if self.kind == "fsdp2":
            return self.owner._sharded_param_data
        if self.kind == "dtensor":
            return self.param._local_tensor
        if self.kind == "fsdp1":
            return self.param
        if not isinstance(self.param, DTensor):
            return self.param
        with torch.no_grad():
            view = self.param.to_local()  # a new view object per call: keep one while it is the same
        kept = self.owner
        if kept is None or kept.data_ptr() != view.data_ptr() or kept.shape != view.shape:
            self.owner = kept = view
        return kept

    @property
    def movable(self) -> bool:
        return self.kind != "copy"

    def move(self, t: torch.Tensor, view: torch.Tensor) -> None:
        """Re-point every reference FSDP or DTensor reads at ``view`` (same values, new memory).

        ``t`` is the tensor the engine holds; if it is no longer the shard's current one (FSDP
        replaced it: ``model.to()``), only ``t`` itself moves (the old storage being freed).
        """
        if t is not self.tensor():
            t.data = view
        elif self.kind == "fsdp2":
            fsdp_param = self.owner
            old_local = fsdp_param.sharded_param._local_tensor
            fsdp_param._sharded_param_data.data = view
            dim = fsdp_param.fsdp_placement.dim
            padded = view.view(fsdp_param.padded_sharded_param_size)
            old_local.data = padded.narrow(dim, 0, old_local.size(dim) if old_local.numel() else 0)
        elif self.kind == "dtensor":
            self.param._local_tensor.data = view
        elif self.kind == "fsdp1":  # (FSDP1 sets _local_shard = .data at its lazy init, the first forward)
            local = getattr(self.param, "_local_shard", None)
            sharded = local is None or self.param.data_ptr() == local.data_ptr()
            self.param.data = view
            if local is not None and sharded:
                self.param._local_shard = self.param.data
        else:  # (never moved: staged)
            raise AssertionError("a staged shard is never moved")


class Sharding:
    """The sharded parameters of an optimizer, and how rounds reach their local shards.

    Built from the parameters alone (the FSDP2 modules are found through their parameters), and
    checked locally: native HSDP, a parameter sharded across the ranks averaged, and FSDP1's
    ``use_orig_params=True`` views raise here, on every rank alike. A plain parameter next to FSDP2
    ones that FSDP2 does not manage (registered after ``fully_shard``) is found here too, and
    refused at binding (:meth:`before_round`, in the bind's control collective): every rank raises.

    Args:
        named: every parameter of the optimizer with its name for errors, in ``param_groups`` order.
        group: the ranks averaged over (``None``: the default group).
    """

    def __init__(self, named: Sequence[tuple[str, torch.Tensor]], group: Any) -> None:
        self._group_ranks = _ranks(group) if dist.is_available() and dist.is_initialized() else None
        self._dims: dict[tuple[int, int], bool] = {}  # (id(mesh), dim) -> is the group averaged over
        fsdp2, modules = _fsdp2_params()
        self.shards: dict[int, _Shard] = {}
        owned: set[int] = set()
        plain: dict[int, tuple[str, torch.Tensor]] = {}  # floating parameters no one shards
        spread = 1  # the most ranks an FSDP2 parameter is sharded over within a replica
        for name, p in named:
            if id(p) in self.shards or id(p) in plain:
                continue
            try:
                shard = self._classify(p, fsdp2)
            except (TypeError, ValueError) as e:
                raise type(e)(f"{name}: {e}") from None
            if shard is not None:
                self.shards[id(p)] = shard
                if shard.kind == "fsdp2":
                    owned.add(id(shard.owner))
                if id(p) in fsdp2:
                    spread = max(spread, p.device_mesh.size())
            elif not isinstance(p, DTensor) and (p.is_floating_point() or p.is_complex()):
                plain[id(p)] = (name, p)
        # the FSDP2 modules holding our parameters: resharded before any averaged value is written
        self.modules = [m for m in modules if any(
            id(fp) in owned for g in m._get_fsdp_state()._fsdp_param_groups for fp in g.fsdp_params)] \
            if owned else []
        #: why binding must fail (raised by the bind's control collective, so on every rank), or None
        self.refusal = _unmanaged(list(plain.values()), spread, modules) if plain and spread > 1 else None
        self._fsdp1 = [s for s in self.shards.values() if s.kind == "fsdp1"]
        self._fsdp2 = [s for s in self.shards.values() if s.kind == "fsdp2"]

    def _classify(self, p: torch.Tensor, fsdp2: dict[int, Any]) -> _Shard | None:
        if isinstance(p, FlatParameter):
            if FALLBACK_REASON is not None or not hasattr(p, "_shard_param_infos"):
                return _Shard(p, "copy", why=FALLBACK_REASON or "FlatParameter._shard_param_infos is missing")
            return _Shard(p, "fsdp1")
        if getattr(p, "_fsdp_flattened", False) and not isinstance(p, DTensor):
            raise TypeError(
                "it belongs to an FSDP1 module wrapped with use_orig_params=True: the optimizer holds views "
                "of this rank's flat shard, whose layout LocalSGDOptimizer cannot check across ranks. Wrap with "
                "use_orig_params=False (the optimizer then holds FSDP1's FlatParameters, averaged in place), or "
                "shard with FSDP2 (fully_shard)"
            )
        if not isinstance(p, DTensor):
            return None
        fsdp_param = fsdp2.get(id(p))
        how = _all_reduces_gradients(fsdp_param) if fsdp_param is not None else None
        if how is not None:
            raise ValueError(
                f"it is managed by {how}, which all-reduces gradients across replicas at every step: there is "
                "nothing left for Local SGD to average, and torch has no switch to turn that all-reduce off. "
                "Shard over the shard dimension only and average over the replicate one: "
                "fully_shard(model, mesh=mesh['shard']); LocalSGDOptimizer(opt, process_group=mesh['replicate'])"
            )
        local = getattr(p, "_local_tensor", None)
        if local is not None and type(local) not in (torch.Tensor, nn.Parameter):
            raise TypeError(
                f"its local shard is a {type(local).__name__}, a tensor subclass (such as torchao's float8 "
                "all-gather weights): FSDP gathers from memory inside it that LocalSGDOptimizer cannot reach, "
                "so averaging it is not supported; train without the subclass, or without Local SGD"
            )
        self._check_not_sharded_over_group(p)
        why = FALLBACK_REASON
        if fsdp_param is not None:
            if why is None and getattr(fsdp_param, "offload_to_cpu", False):
                why = "FSDP2 CPU offload keeps the shard in pinned host memory"
            if why is None and not all(hasattr(fsdp_param, a) for a in (
                    "_sharded_param_data", "padded_sharded_param_size", "fsdp_placement")):
                why = "FSDPParam has none of _sharded_param_data, padded_sharded_param_size, fsdp_placement"
            if why is None and (fsdp_param._sharded_param_data.numel() != fsdp_param.padded_sharded_param_size.numel()
                                or fsdp_param._sharded_param_data.untyped_storage().data_ptr()
                                != p._local_tensor.untyped_storage().data_ptr()):
                why = "the local tensor is not a view of FSDPParam._sharded_param_data"
            return _Shard(p, "copy", why=why) if why else _Shard(p, "fsdp2", fsdp_param)
        if why is None and not hasattr(p, "_local_tensor"):
            why = "DTensor._local_tensor is missing"
        return _Shard(p, "copy", why=why) if why else _Shard(p, "dtensor")

    def _averaged_dim(self, mesh: Any, dim: int) -> bool:
        """Whether mesh dimension ``dim`` is the group averaged over (its ranks are ours)."""
        key = (id(mesh), dim)
        found = self._dims.get(key)
        if found is None:
            found = self._dims[key] = self._group_ranks is not None and _ranks(mesh.get_group(dim)) == self._group_ranks
        return found

    def _check_not_sharded_over_group(self, p: torch.Tensor) -> None:
        """Raise if one of ``p``'s mesh dimensions that shards it *is* the group averaged over."""
        mesh = p.device_mesh
        for dim, placement in enumerate(p.placements):
            if isinstance(placement, Replicate):
                continue
            if self._averaged_dim(mesh, dim):
                name = mesh.mesh_dim_names[dim] if mesh.mesh_dim_names else dim
                raise ValueError(
                    f"it is {placement!r} over mesh dimension {name!r}, whose ranks {list(self._group_ranks)} "
                    "are the process_group averaged over: each holds a different shard, and averaging them would "
                    "mix shards. Pass the replicate dimension's group: process_group=mesh['replicate'] (the ranks "
                    "holding the same shard in different replicas)"
                )

    def replica_groups(self) -> list[Any] | None:
        """The process groups that span one replica: every mesh dimension of a sharded parameter
        that is not the group averaged over, once each, in parameter order (a ``MAX`` over each in
        turn is a ``MAX`` over the replica's ranks); ``None`` with FSDP1, whose groups are not
        described by a mesh."""
        if self._fsdp1 or any(s.kind == "copy" and not isinstance(s.param, DTensor) for s in self.shards.values()):
            return None
        groups, seen = [], set()
        for shard in self.shards.values():
            mesh = shard.param.device_mesh
            for dim in range(mesh.ndim):
                if (id(mesh), dim) not in seen and not self._averaged_dim(mesh, dim):
                    seen.add((id(mesh), dim))
                    groups.append(mesh.get_group(dim))
        return groups

    # -- what rounds see ------------------------------------------------------------------------

    def __bool__(self) -> bool:
        return bool(self.shards)

    @property
    def has_fsdp1(self) -> bool:
        """Whether an FSDP1 ``FlatParameter`` is among the parameters (zero-copy or staged)."""
        return any(isinstance(s.param, FlatParameter) for s in self.shards.values())

    def locals(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The plain tensor averaged for each of ``params`` (read afresh: FSDP may have replaced it)."""
        shards = self.shards
        return [shards[id(p)].tensor() if id(p) in shards else p for p in params]

    def local(self, t: torch.Tensor) -> torch.Tensor:
        """A DTensor's local tensor (optimizer state, a frozen parameter); anything else as it is."""
        shard = self.shards.get(id(t))
        if shard is not None:
            return shard.tensor()
        return t._local_tensor if isinstance(t, DTensor) else t

    def fallbacks(self) -> list[str]:
        """Why parameters use the copy path (empty when every shard is zero-copy)."""
        return sorted({s.why for s in self.shards.values() if s.kind == "copy" and s.why})

    def placement(self) -> tuple[Callable[[torch.Tensor, torch.Tensor], None], set[int]]:
        """For the engine's next plan: ``move(tensor, view)``, which re-points a shard's every
        reference (anything else: ``.data``), and the ids of the tensors that must stay staged."""
        by_tensor = {id(s.tensor()): s for s in self.shards.values() if s.movable}
        staged = {id(s.tensor()) for s in self.shards.values() if not s.movable}

        def move(t: torch.Tensor, view: torch.Tensor) -> None:
            shard = by_tensor.get(id(t))
            if shard is None:
                t.data = view
            else:
                shard.move(t, view)
        return move, staged

    def describe(self, p: torch.Tensor) -> tuple:
        """What ranks averaged together must agree on for ``p`` beyond its dtype and global shape: the
        placements, the local shape, and which shard it is (mesh coordinate on every dimension that is
        not the group averaged over; FSDP1: the slices of the original parameters it holds)."""
        shard = self.shards.get(id(p))
        if shard is None:
            return ()
        if isinstance(p, DTensor):
            mesh = p.device_mesh
            coordinate = mesh.get_coordinate() or ()
            where = tuple(c for dim, c in enumerate(coordinate) if not self._averaged_dim(mesh, dim))
            return ("dtensor", tuple(map(repr, p.placements)), tuple(p._local_tensor.shape), where)
        infos = getattr(p, "_shard_param_infos", None)  # per original parameter: its slice in this shard
        held = None if infos is None else tuple(
            (getattr(i, "intra_param_start_idx", None), getattr(i, "intra_param_end_idx", None))
            if getattr(i, "in_shard", True) else None for i in infos)
        return ("fsdp1", tuple(getattr(p, "_sharded_size", p.shape)), held)

    def identity(self, named: Sequence[tuple[str, torch.Tensor]]) -> list[tuple]:
        """Which shard of each sharded parameter this rank holds, in plain values (for checkpoints):
        ``(name, describe)`` for every sharded parameter."""
        return [(name, self.describe(p)) for name, p in named if id(p) in self.shards]

    # -- before any averaged value is written -----------------------------------------------------

    def before_round(self) -> None:
        """Reshard every FSDP2 module (an eval forward can leave the root unsharded: a write into the
        shard would then be invisible to the next forward); FSDP1 flat parameters must be sharded.

        First, a parameter found unaverageable when the parameters were read (:attr:`refusal`)
        raises: this runs inside every round's control collective, the bind's first, so that error
        reaches every rank (a rank without it names the rank that has it) and nothing has moved.
        """
        if self.refusal is not None:
            raise ValueError(self.refusal)
        for module in self.modules:
            module.reshard()
        for shard in self._fsdp2:
            if shard.owner.sharded_param is not shard.param:
                name = getattr(shard.owner, "_param_fqn", None) or "of the model"
                raise ValueError(
                    f"an FSDP2 parameter ({name}) was replaced in its module (load_state_dict(assign=True), or a new nn.Parameter set): "
                    "the optimizer still holds the old one, which the model no longer uses. Load without assign=True, "
                    "or build the optimizer and LocalSGDOptimizer after loading"
                )
        for shard in self._fsdp1:
            p = shard.param
            local = getattr(p, "_local_shard", None)
            if local is not None and p.data_ptr() != local.data_ptr():
                raise LocalSGDError(
                    "an FSDP1 FlatParameter is unsharded at an averaging round (after a forward that did not "
                    "reshard: SHARD_GRAD_OP, or a forward without backward): averaging needs each rank's shard. "
                    "Run the round after backward and the optimizer step, or use FSDP2 (fully_shard)"
                )


def _unmanaged(plain: Sequence[tuple[str, torch.Tensor]], spread: int, modules: Sequence[nn.Module]) -> str:
    """Why plain parameters cannot be averaged next to FSDP2 ones sharded over ``spread`` ranks.

    FSDP2 keeps a replica's shards consistent: it all-gathers the parameters and reduce-scatters
    the gradients over the shard ranks. A plain parameter it does not manage (registered after
    ``fully_shard``, or from a module outside it) gets neither: each shard rank trains its own copy
    on its own data, and a round, over the replicas only, never brings the copies together. Even
    copies equal by construction stay so only by chance: refused, not averaged.
    """
    fqns: dict[int, str] = {}  # the longest name is the one from the root module: the full FQN
    for module in modules:
        for fqn, p in module.named_parameters():
            if len(fqn) > len(fqns.get(id(p), "")):
                fqns[id(p)] = fqn
    described = []
    for name, p in plain:
        fqn = fqns.get(id(p))
        if fqn is not None and name.startswith("parameter ("):  # (no param_names: name it by its FQN)
            name = f"parameter {fqn!r} {name.removeprefix('parameter ')}"
        described.append(f"{name}, {str(p.dtype).removeprefix('torch.')}{list(p.shape)}")
    more = f" (and {len(described) - 3} more)" if len(described) > 3 else ""
    return (
        f"{'; '.join(described[:3])}{more}: a plain tensor in a model FSDP2 (fully_shard) shards over {spread} "
        "ranks per replica, but FSDP2 does not manage it (was it registered after fully_shard?). Each of "
        "those ranks holds and trains its own copy, and LocalSGDOptimizer averages over process_group, across "
        "replicas only, so the copies would differ within a replica for good. Register it before "
        "fully_shard (which then shards it), call fully_shard on its module too "
        "(fully_shard(module, mesh=mesh['shard'])), or leave it out of the optimizer"
    )


def named_params(param_groups: Sequence[dict[str, Any]]) -> list[tuple[str, torch.Tensor]]:
    """Every parameter with the name errors give it: ``parameter 'w' (param group 0, index 1)``."""
    named = []
    for g, param_group in enumerate(param_groups):
        given = param_group.get("param_names")
        for i, p in enumerate(param_group["params"]):
            where = f"param group {g}, index {i}"
            named.append((f"parameter {given[i]!r} ({where})" if given else f"parameter ({where})", p))
    return named


def find_sharding(param_groups: Sequence[dict[str, Any]], group: Any) -> Sharding | None:
    """The :class:`Sharding` of an optimizer's parameters, or ``None`` when none is sharded (the plain path)."""
    named = named_params(param_groups)
    if not any(isinstance(p, (DTensor, FlatParameter)) or getattr(p, "_fsdp_flattened", False) for _, p in named):
        return None
    return Sharding(named, group)
