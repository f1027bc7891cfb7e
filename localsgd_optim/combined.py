"""Several optimizers over disjoint parameters, stepped as one (Muon for the matrices, AdamW for the rest)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable

import torch
from torch.optim import Optimizer

__all__ = ["Combined"]

_STATE, _GROUPS, _PARAMS = "state", "param_groups", "params"


class _MergedState(Mapping):
    """A live, read-only view of the parts' ``state`` dicts (each parameter is in one part).

    Like the ``defaultdict`` a torch optimizer keeps, ``state[p]`` for a parameter of a part
    that has no state yet is that part's new, empty entry (``get`` and ``in`` create nothing);
    a parameter of no part is a ``KeyError``.
    """

    def __init__(self, parts: list[Optimizer]) -> None:
        self._parts = parts

    def __getitem__(self, param: torch.Tensor) -> Any:
        for part in self._parts:
            if param in part.state:
                return part.state[param]
        for part in self._parts:  # no state yet: the owner's defaultdict makes its entry
            if any(param is p for group in part.param_groups for p in group[_PARAMS]):
                return part.state[param]
        raise KeyError(param)

    def __contains__(self, param: object) -> bool:
        return any(param in part.state for part in self._parts)

    def get(self, param: torch.Tensor, default: Any = None) -> Any:
        for part in self._parts:
            if param in part.state:
                return part.state[param]
        return default

    def __iter__(self) -> Iterator[torch.Tensor]:
        for part in self._parts:
            yield from part.state

    def __len__(self) -> int:
        return sum(len(part.state) for part in self._parts)


class _ConcatGroups(Sequence):
    """A live view of the parts' ``param_groups``, concatenated in part order.

    Read afresh at every access, never copied: a part's ``load_state_dict`` (which replaces its
    list of groups) or ``add_param_group`` shows at once, to every holder of this object (an LR
    scheduler, a :class:`~localsgd_optim.LocalSGDOptimizer` sharing it by reference). Its items
    are the parts' own group dicts, so a write to one (``group["lr"] = ...``) is the part's.
    """

    def __init__(self, parts: list[Optimizer]) -> None:
        self._parts = parts

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for part in self._parts:
            yield from part.param_groups

    def __len__(self) -> int:
        return sum(len(part.param_groups) for part in self._parts)

    def __getitem__(self, index: Any) -> Any:
        return list(self)[index]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, (Sequence, list)) and list(self) == list(other)

    def __repr__(self) -> str:
        return repr(list(self))


def _takes_betas(part: Optimizer) -> bool:
    """Whether ``part``'s first-moment coefficient is ``betas[0]`` (Adam-like) rather than ``momentum``."""
    return "betas" in part.defaults and "momentum" not in part.defaults


class Combined(Optimizer):
    r"""Step several optimizers over disjoint parameters as one optimizer.

    ``torch.optim.Muon`` takes 2-D parameters only; the rest need another optimizer (its docs:
    AdamW). ``Combined(Muon(matrices), AdamW(rest))`` is one optimizer, so one
    :class:`~localsgd_optim.LocalSGDOptimizer` averages the whole model in one round (one set of
    buckets), and one LR scheduler drives both.

    ``param_groups`` is a live view of the parts' own groups, concatenated in part order: a
    scheduler's writes reach the parts, and it stays current when a part loads a state dict or
    gains a group. ``state`` is a live view of the parts' states. ``defaults`` holds what every
    part has (the first part's value), plus ``momentum`` when every part has a first-moment
    coefficient: ``momentum`` in some parts, ``betas[0]`` in the others (Muon or SGD with AdamW).
    Then momentum-cycling schedulers (``OneCycleLR``, ``CyclicLR`` with ``cycle_momentum=True``,
    which write ``group["momentum"]`` in every group) drive both: each group of a ``betas`` part
    carries ``"momentum"``, equal to its ``betas[0]`` at construction, and once such a scheduler
    owns a group (it sets ``"max_momentum"``), each :meth:`step` copies ``group["momentum"]``
    into ``betas[0]``, as the scheduler would on that part alone.

    ``state_dict()`` has torch's layout: ``"state"`` keyed by the parameter's index across the
    concatenated groups, and ``"param_groups"`` concatenated, each with ``"combined_part"``
    (:attr:`PART_KEY`), the index of its part. DCP's ``get_optimizer_state_dict`` /
    ``set_optimizer_state_dict`` and :mod:`localsgd_optim.checkpoint` take it as they take any
    optimizer's. :meth:`load_state_dict` also reads the layout of earlier releases,
    ``{"combined": [one state dict per part]}``.

    Args:
        *optimizers: the parts, in a fixed order (every rank the same), no parameter in two.

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        >>> matrices = [p for p in model.parameters() if p.ndim == 2]
        >>> rest = [p for p in model.parameters() if p.ndim != 2]
        >>> opt = Combined(torch.optim.Muon(matrices, lr=0.02), torch.optim.AdamW(rest, lr=1e-3))
        >>> sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.02, 1e-3], total_steps=4)
        >>> model(torch.ones(3, 4)).sum().backward()
        >>> opt.step(); sched.step()
        >>> [g["lr"] for g in opt.param_groups] == sched.get_last_lr()
        True
        >>> opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "combined_part": 1})
        >>> [len(part.param_groups) for part in opt.optimizers]
        [1, 2]
    """

    #: The key, in each group of :meth:`state_dict` and of :meth:`add_param_group`, naming its part.
    PART_KEY = "combined_part"
    #: The key of :meth:`state_dict` holding a part's entries other than ``state`` and ``param_groups``.
    EXTRA_KEY = "combined_extra"
    #: The key of the layout of earlier releases: ``{"combined": [one state dict per part]}``.
    OLD_KEY = "combined"

    def __init__(self, *optimizers: Optimizer) -> None:
        if not optimizers:
            raise ValueError("Combined needs at least one optimizer, got none")
        for i, part in enumerate(optimizers):
            if not isinstance(part, Optimizer) or isinstance(part, Combined):
                raise TypeError(
                    f"Combined: argument {i} must be a torch.optim.Optimizer (not a Combined), "
                    f"got {type(part).__name__}"
                )
        seen: dict[int, int] = {}
        for i, part in enumerate(optimizers):
            for group in part.param_groups:
                for p in group[_PARAMS]:
                    if id(p) in seen:
                        raise ValueError(
                            f"Combined: a parameter of shape {tuple(p.shape)} is in optimizers {seen[id(p)]} and "
                            f"{i}; give each parameter to one optimizer"
                        )
                    seen[id(p)] = i
        self.optimizers = list(optimizers)
        self._binding = True
        super().__init__([p for part in optimizers for g in part.param_groups for p in g[_PARAMS]], {})
        self._binding = False
        self.param_groups = _ConcatGroups(self.optimizers)  # type: ignore[assignment]
        self.state = _MergedState(self.optimizers)  # type: ignore[assignment]
        # The parts whose ``betas[0]`` follows ``group["momentum"]``: only when the parts mix
        # ``momentum`` and ``betas``, every one having one of them.
        betas = [_takes_betas(part) for part in self.optimizers]
        mixed = any(betas) and not all(betas) and all(
            b or "momentum" in part.defaults for b, part in zip(betas, self.optimizers))
        self._betas_parts = [i for i, b in enumerate(betas) if b] if mixed else []
        self.defaults = self._common_defaults()
        for i, part in enumerate(self.optimizers):
            for group in part.param_groups:
                self._alias_momentum(i, group)

    # -- defaults and the momentum alias ---------------------------------------------------------

    def _common_defaults(self) -> dict[str, Any]:
        # Only keys every part's groups have: a wrapper registering these groups again
        # (LocalSGDOptimizer's Optimizer.__init__) ``setdefault``s each key into each group, and a
        # key of one part must not land in another's groups. A merge would also hold both
        # "momentum" and "betas", and OneCycleLR would then cycle ``betas`` in SGD's groups.
        first, rest = self.optimizers[0].defaults, self.optimizers[1:]
        defaults = {key: value for key, value in first.items() if all(key in part.defaults for part in rest)}
        if self._betas_parts:
            defaults["momentum"] = next(part.defaults["momentum"] for part in self.optimizers
                                        if "momentum" in part.defaults)
        return defaults

    def _alias_momentum(self, part: int, group: dict[str, Any]) -> None:
        if part in self._betas_parts and "betas" in group:
            group.setdefault("momentum", group["betas"][0])

    def _sync_momentum(self) -> None:
        """Copy ``group["momentum"]`` into ``betas[0]`` where a momentum-cycling scheduler owns it."""
        for i in self._betas_parts:
            for group in self.optimizers[i].param_groups:
                if "max_momentum" in group and "momentum" in group and "betas" in group:
                    betas = group["betas"]
                    if betas[0] != group["momentum"]:
                        group["betas"] = (group["momentum"], *betas[1:])

    # -- the Optimizer interface -----------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to one part: ``param_group[Combined.PART_KEY]`` is its index.

        With a single part the key may be left out. Through a
        :class:`~localsgd_optim.LocalSGDOptimizer` (``opt.add_param_group(...)``) the new
        parameters are averaged from the next round.

        Args:
            param_group: the group, as for :meth:`torch.optim.Optimizer.add_param_group`, plus
                ``"combined_part"``: the index of the part that steps it.
        """
        if self._binding:  # Optimizer.__init__ registering Combined's own (unused) group
            super().add_param_group(param_group)
            return
        if not isinstance(param_group, dict):
            raise TypeError(f"Combined.add_param_group: param_group must be a dict, got {type(param_group).__name__}")
        n = len(self.optimizers)
        part = param_group.get(self.PART_KEY, 0 if n == 1 else None)
        if isinstance(part, bool) or not isinstance(part, int) or not 0 <= part < n:
            raise ValueError(
                f"Combined.add_param_group: param_group[{self.PART_KEY!r}] must be the index of the optimizer "
                f"that steps the group, an int in [0, {n}), got {part!r}; e.g. "
                f"{{'params': [...], {self.PART_KEY!r}: {n - 1}}} for {type(self.optimizers[-1]).__name__}"
            )
        group = {key: value for key, value in param_group.items() if key != self.PART_KEY}
        params = group.get(_PARAMS)
        if isinstance(params, torch.Tensor):
            params = group[_PARAMS] = [params]
        elif params is not None and not isinstance(params, set):  # (none, or a set: the part's own error)
            params = group[_PARAMS] = list(params)  # (a generator is read once, here)
        for p in params if isinstance(params, list) else ():
            tensor = p[1] if isinstance(p, tuple) else p
            owner = next((i for i, other in enumerate(self.optimizers) if i != part and any(
                tensor is q for g in other.param_groups for q in g[_PARAMS])), None)
            if owner is not None:
                raise ValueError(
                    f"Combined.add_param_group: a parameter of shape {tuple(tensor.shape)} is already in optimizer "
                    f"{owner}, and the group is for optimizer {part}; give each parameter to one optimizer"
                )
        self.optimizers[part].add_param_group(group)
        self._alias_momentum(part, self.optimizers[part].param_groups[-1])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Step every part, in order.

        Args:
            closure: re-evaluates the model and returns the loss (called once, before the parts step).

        Returns:
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_momentum()
        for part in self.optimizers:
            part.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of every part (see :meth:`torch.optim.Optimizer.zero_grad`)."""
        for part in self.optimizers:
            part.zero_grad(set_to_none=set_to_none)

    # -- checkpoints -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The parts' state dicts as one, in torch's layout.

        ``"state"`` is keyed by the parameter's index across the concatenated groups (the order
        of :attr:`param_groups`), ``"param_groups"`` are the parts' groups, concatenated, each
        with ``"combined_part"``: the index of its part. A part's entries other than those two
        (none for torch's optimizers) are kept under ``"combined_extra"``.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        self._sync_momentum()
        state: dict[int, Any] = {}
        groups: list[dict[str, Any]] = []
        extra: dict[int, dict[str, Any]] = {}
        offset = 0
        for i, part in enumerate(self.optimizers):
            saved = part.state_dict()
            ids = list(itertools.chain.from_iterable(g[_PARAMS] for g in saved[_GROUPS]))
            index: dict[Any, int] = {}
            for position, pid in enumerate(ids, offset):
                index.setdefault(pid, position)
            for key, value in saved[_STATE].items():
                if key not in index:
                    raise ValueError(
                        f"Combined.state_dict: optimizer {i} ({type(part).__name__}) saved state under {key!r}, "
                        "which is not one of its parameters' ids; its state_dict must key its state as "
                        "torch.optim.Optimizer.state_dict does"
                    )
                state[index[key]] = value
            for group in saved[_GROUPS]:
                groups.append({**group, _PARAMS: [index[pid] for pid in group[_PARAMS]], self.PART_KEY: i})
            others = {key: value for key, value in saved.items() if key not in (_STATE, _GROUPS)}
            if others:
                extra[i] = others
            offset += len(ids)
        state_dict: dict[str, Any] = {_STATE: state, _GROUPS: groups}
        if extra:
            state_dict[self.EXTRA_KEY] = extra
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` into the parts.

        Also takes one whose state is keyed by parameter name (DCP's ``set_optimizer_state_dict``
        passes those), one whose groups lost ``"combined_part"`` (then the groups are split by the
        parts' group counts), and the layout of earlier releases, ``{"combined": [one state dict
        per part]}``. Everything is checked against the parts before any part changes.

        Args:
            state_dict: the state to load.
        """
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        if isinstance(state_dict, Mapping) and _STATE in state_dict and _GROUPS in state_dict:
            parts = self._split(state_dict)
        elif isinstance(state_dict, Mapping) and isinstance(state_dict.get(self.OLD_KEY), (list, tuple)) \
                and len(state_dict[self.OLD_KEY]) == len(self.optimizers):
            parts = list(state_dict[self.OLD_KEY])
        else:
            raise self._error(state_dict, "")
        for part, saved in zip(self.optimizers, parts):
            part.load_state_dict(saved)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _error(self, state_dict: Any, problem: str) -> ValueError:
        counts = [len(part.param_groups) for part in self.optimizers]
        names = ", ".join(f"{c} of {type(part).__name__}" for c, part in zip(counts, self.optimizers))
        if not problem:
            if isinstance(state_dict, Mapping):
                problem = f"keys {sorted(map(str, state_dict))}"
                if isinstance(state_dict.get(self.OLD_KEY), (list, tuple)):
                    problem = f"{{{self.OLD_KEY!r}: [{len(state_dict[self.OLD_KEY])} state dicts]}}"
            else:
                problem = f"a {type(state_dict).__name__}"
        return ValueError(
            f"Combined.load_state_dict: expected the state dict of a Combined of the same {len(self.optimizers)} "
            f"optimizers, {{'state': ..., 'param_groups': [{sum(counts)} groups: {names}]}} (or, as earlier releases "
            f"saved it, expected {{'combined': [one state dict per optimizer ({len(self.optimizers)})]}}); got "
            f"{problem}; load a state dict saved by the same Combined"
        )

    def _split(self, state_dict: Mapping[str, Any]) -> list[dict[str, Any]]:
        """One state dict per part (state re-keyed ``0..n-1`` as the part's own), or a ``ValueError``."""
        groups, state = state_dict[_GROUPS], state_dict[_STATE]
        if not isinstance(groups, (list, tuple)) or not isinstance(state, Mapping) or not all(
                isinstance(g, Mapping) and isinstance(g.get(_PARAMS), (list, tuple)) for g in groups):
            raise self._error(state_dict, "'param_groups' that is not a list of groups with 'params' lists, or a "
                                     "'state' that is not a dict")
        n = len(self.optimizers)
        counts = [len(part.param_groups) for part in self.optimizers]
        marked = [self.PART_KEY in g for g in groups]
        if all(marked) and groups:
            owners = [g[self.PART_KEY] for g in groups]
            if not all(isinstance(o, int) and not isinstance(o, bool) and 0 <= o < n for o in owners):
                raise self._error(state_dict, f"group parts {owners}, not all in [0, {n})")
            if owners != sorted(owners):
                raise self._error(state_dict, f"group parts {owners}, not in part order")
            found = [owners.count(i) for i in range(n)]
            if found != counts:
                raise self._error(state_dict, f"{found} groups per optimizer, where these have {counts}")
        elif not any(marked):  # (DCP's flattened state dicts keep only the live groups' keys)
            if len(groups) != sum(counts):
                raise self._error(state_dict, f"{len(groups)} groups without {self.PART_KEY!r}")
            owners = [i for i, c in enumerate(counts) for _ in range(c)]
        else:
            raise self._error(state_dict, f"{self.PART_KEY!r} in {sum(marked)} of its {len(groups)} groups only")
        extra = state_dict.get(self.EXTRA_KEY) or {}
        parts: list[dict[str, Any]] = []
        used: set[Any] = set()
        start = 0
        for i, (part, count) in enumerate(zip(self.optimizers, counts)):
            mine = groups[start:start + count]
            start += count
            local: dict[Any, int] = {}
            part_groups = []
            for live, saved in zip(part.param_groups, mine):
                if len(saved[_PARAMS]) != len(live[_PARAMS]):
                    raise self._error(state_dict, (
                        f"a group of optimizer {i} ({type(part).__name__}) with {len(saved[_PARAMS])} parameters, "
                        f"where its group has {len(live[_PARAMS])}"))
                for key in saved[_PARAMS]:
                    local.setdefault(key, len(local))
                part_groups.append({**{k: v for k, v in saved.items() if k != self.PART_KEY},
                                    _PARAMS: [local[key] for key in saved[_PARAMS]]})
            used.update(local)
            part_state = {local[key]: value for key, value in state.items() if key in local}
            parts.append({_STATE: part_state, _GROUPS: part_groups, **extra.get(i, {})})
        stray = [key for key in state if key not in used]
        if stray:
            raise self._error(state_dict, f"state for {stray[:3]!r}, which no group's 'params' holds")
        return parts

    def __getstate__(self) -> dict[str, Any]:
        # torch's Optimizer pickles defaults, state and param_groups only: a copy would lose the parts.
        return self.__dict__.copy()
