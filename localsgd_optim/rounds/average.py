"""Plain averaging: warmup rounds, ``sync()``, scheduled and hierarchical (local) rounds."""

from __future__ import annotations

from .._dist import RoundKind
from .base import Reducer, Round, RoundContext

__all__ = ["AverageRound"]


class AverageRound(Round):
    """Replace every parameter (and averaged buffer) by its mean over the round's group.

    Args:
        kind: what the control collective calls it (scheduled, ``sync()``, local).
        local: run over the hierarchical local group.
    """

    def __init__(self, kind: RoundKind, local: bool = False) -> None:
        self.kind = kind
        self.local = local
        self.reducer = Reducer()

    def prepare(self, ctx: RoundContext) -> None:
        self.reducer.prepare(ctx)

    def run(self, ctx: RoundContext, contributors: int, joined: bool) -> None:
        if contributors:  # every rank of this group has joined: all of them skip
            self.reducer.reduce(ctx, contributors, joined)
