"""The schedule's cursor, a pure function of the step: checked over a grid against the definitions."""

from __future__ import annotations

import itertools

import pytest

from localsgd_optim._schedule import Cursor, Schedule
from reference import reference_events

STEPS = 200
PAIRS = [(10, 2), (None, 5)]


def _by_pairs(step):
    return 2 if step <= 10 else 5


def _grows(step):  # a callable period: short intervals first, then long ones
    return 3 if step < 40 else 7


PERIODS = {"int": (4, lambda step: 4), "pairs": (PAIRS, _by_pairs), "callable": (_grows, _grows)}
GRID = [
    (name, warmup, local_k, tau)
    for name, warmup, local_k, tau in itertools.product(PERIODS, [0, 3], [0, 3], [0, 1])
    if not (local_k and tau)  # refused by the optimizer: overlap with hierarchical rounds
]


def _names(events):
    return [(step, event.name) for step, event in events]


@pytest.mark.parametrize("name, warmup, local_k, tau", GRID)
def test_cursor_matches_the_definitions_over_200_steps(name, warmup, local_k, tau):
    spec, period_at = PERIODS[name]
    cursor = Cursor(Schedule(spec, warmup), local_k, tau)
    everything = _names(cursor.events(STEPS))
    assert everything == reference_events(period_at, warmup, local_k, tau, STEPS)
    assert sum(e == "GLOBAL_ROUND" for _, e in everything) >= 20  # the grid really has rounds
    # seek() (a resume) continues exactly where an uninterrupted cursor is, from any step
    for start in range(0, STEPS, 7):
        resumed = Cursor(Schedule(spec, warmup), local_k, tau)
        resumed.seek(start)
        assert _names(resumed.events(STEPS)) == [(s, e) for s, e in everything if s > start]


def test_overlap_as_long_as_the_period_is_refused_at_the_launch():
    cursor = Cursor(Schedule(4), overlap_steps=4)
    assert _names(cursor.events(3)) == []
    with pytest.raises(ValueError, match="overlap_steps=4 must be smaller than the period: the round "
                                         "launched at step 4 would still be in flight"):
        cursor.advance()


def test_nothing_happens_between_rounds():
    cursor = Cursor(Schedule(8))
    assert [cursor.advance() for _ in range(7)] == [()] * 7
    assert [e.name for e in cursor.advance()] == ["GLOBAL_ROUND"]
