"""When to average: the schedule, kept apart from how averaging is done."""

from __future__ import annotations

import math
import numbers
import time
import warnings
from enum import IntEnum
from typing import Any, Callable, Sequence, Union

import torch

__all__ = ["Schedule", "FragmentSchedule", "TimedSchedule", "PeriodSpec", "Event", "Cursor", "TimedCursor"]

#: A period: a fixed ``k``, a list of ``(until_step, period)`` pairs (``None`` = forever),
#: or a callable mapping the first step of an interval to that interval's period.
PeriodSpec = Union[int, Sequence[tuple], Callable[[int], int]]


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


class Schedule:
    """Which ``step()`` calls end with an averaging round (steps counted from 1).

    Steps ``1..warmup_steps`` are the synchronous warmup of post-local SGD. After it,
    rounds fall at ``r_1 < r_2 < ...`` with ``r_0 = warmup_steps`` and
    ``r_{i+1} = r_i + period(r_i + 1)``: each interval's length is the period in force
    at its first step. The schedule is a pure function of the step count, so every rank
    computes the same rounds and a resumed run continues them exactly.

    Args:
        k: the period: an int >= 1; a list of ``(until_step, period)`` pairs, meaning
            ``period`` for intervals starting at or before ``until_step`` (``None`` in the
            last pair: forever), e.g. ``[(1000, 32), (None, 8)]``; or a callable
            ``step -> period`` (deterministic, the same on every rank).
        warmup_steps: synchronous steps before Local SGD starts (an int >= 0).
    """

    def __init__(self, k: PeriodSpec, warmup_steps: int = 0) -> None:
        if not _is_int(warmup_steps) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        self.warmup_steps = int(warmup_steps)
        self.spec = k
        if callable(k) and not isinstance(k, (list, tuple)):
            self._period: Callable[[int], int] = k
            self.description: Any = f"callable {getattr(k, '__module__', '?')}.{getattr(k, '__qualname__', repr(k))}"
        elif isinstance(k, (list, tuple)):
            self._pairs = self._parse_pairs(k)
            self._period = self._from_pairs
            self.description = [[u, p] for u, p in self._pairs]
        else:
            if not _is_int(k) or k < 1:
                raise ValueError(
                    "k must be an integer >= 1 (optimizer steps between averaging rounds), a list of "
                    f"(until_step, period) pairs, or a callable step -> period; got {k!r}"
                )
            if k == 1 and warmup_steps == 0:
                warnings.warn(
                    "k=1 averages parameters after every step: that is synchronous data parallel "
                    "training, which DistributedDataParallel does faster by overlapping the gradient "
                    "all-reduce with backward. Use k > 1 for Local SGD.",
                    UserWarning,
                    stacklevel=4,
                )
            k = int(k)
            self._period = lambda step: k
            self.description = k

    @staticmethod
    def _parse_pairs(pairs: Sequence[Any]) -> list[tuple[float, int]]:
        parsed: list[tuple[float, int]] = []
        for i, pair in enumerate(pairs):
            ok = isinstance(pair, (list, tuple)) and len(pair) == 2
            until, period = pair if ok else (None, None)
            if not ok or not (_is_int(period) and period >= 1) or not (until is None or _is_int(until)):
                raise ValueError(
                    f"k[{i}] must be an (until_step, period) pair with period an integer >= 1 and "
                    f"until_step an integer or None, got {pair!r}"
                )
            bound = math.inf if until is None else int(until)
            if parsed and bound <= parsed[-1][0]:
                raise ValueError(f"k's until_step values must increase, got {pairs!r}")
            parsed.append((bound, int(period)))
        if not parsed or parsed[-1][0] != math.inf:
            raise ValueError(f"k's last pair must be (None, period) so every step has a period, got {pairs!r}")
        return [(None if u == math.inf else u, p) for u, p in parsed]  # type: ignore[misc]

    def _from_pairs(self, step: int) -> int:
        for until, period in self._pairs:
            if until is None or step <= until:
                return period
        raise AssertionError("unreachable: the last pair is open-ended")

    def period_at(self, step: int) -> int:
        """The period of the interval that starts at ``step``."""
        period = self._period(step)
        if not _is_int(period) or period < 1:
            raise ValueError(f"k({step}) must return an integer >= 1, got {period!r}")
        return int(period)

    def next_round(self, last_round: int) -> int:
        """The first round after ``last_round`` (a round's step, or the end of warmup)."""
        start = max(last_round, self.warmup_steps)
        return start + self.period_at(start + 1)

    def rounds(self, until: int) -> list[int]:
        """Every step up to ``until`` that ends with a round (warmup steps included)."""
        out = list(range(1, min(until, self.warmup_steps) + 1))
        r = self.next_round(self.warmup_steps)
        while r <= until:
            out.append(r)
            r = self.next_round(r)
        return out

    def __repr__(self) -> str:
        return f"Schedule(k={self.description!r}, warmup_steps={self.warmup_steps})"


class FragmentSchedule:
    """Streaming rounds: ``fragments`` parts of the model, each synced once per period ``k``.

    Fragment ``i`` syncs at the steps ``s > warmup_steps`` with ``(s - warmup_steps) % k ==
    (k * (i + 1) // fragments) % k``: the last fragment at multiples of ``k`` (after warmup),
    fragment 0 first, ``k // fragments`` steps in (torchft's schedule). Every such step is a
    round, for one fragment; :meth:`fragment_at` says which. Needs an integer ``k >= fragments``
    (checked by the config), so no two fragments share a step.
    """

    def __init__(self, schedule: Schedule, fragments: int) -> None:
        self.k, self.fragments, self.warmup_steps = int(schedule.spec), fragments, schedule.warmup_steps
        self.description = schedule.description
        self._fragment_at_phase = {(self.k * (i + 1) // fragments) % self.k: i for i in range(fragments)}

    def fragment_at(self, step: int) -> int:
        """The fragment synced at ``step`` (a round step after warmup)."""
        return self._fragment_at_phase[(step - self.warmup_steps) % self.k]

    def next_round(self, last_round: int) -> int:
        """The first fragment round after ``last_round`` (a round's step, or the end of warmup)."""
        step = max(last_round, self.warmup_steps) + 1
        while (step - self.warmup_steps) % self.k not in self._fragment_at_phase:
            step += 1
        return step


class TimedSchedule(Schedule):
    """Time-budgeted rounds: each replica steps until ``seconds`` have passed since the last round.

    Replicas at different speeds then take different numbers of steps per period, and all of
    them reach the round together: a fast one waits at most for the slow one's step in progress.
    The steps ``1..warmup_steps`` are synchronous, as with a step-counted schedule. The first
    period starts when the optimizer is built (binding is a collective, so every replica starts
    together) or when warmup ends, and each next one when a round completes, a moment every
    replica shares to within the collective's latency.

    Args:
        seconds: the period's wall-time budget (a finite number > 0).
        warmup_steps: synchronous steps before Local SGD starts (an int >= 0).
    """

    def __init__(self, seconds: float, warmup_steps: int = 0) -> None:
        if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real) or not (
                math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"round_every_s must be a finite number of seconds > 0, got {seconds!r}")
        if not _is_int(warmup_steps) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        self.warmup_steps = int(warmup_steps)
        self.seconds = float(seconds)
        self.spec = None
        self.description = {"round_every_s": self.seconds}

    def period_at(self, step: int) -> int:
        raise TypeError("a time-budgeted schedule has no period in steps: its rounds follow the clock")

    def rounds(self, until: int) -> list[int]:
        raise TypeError("a time-budgeted schedule's rounds follow the clock: they cannot be listed in advance")

    def __repr__(self) -> str:
        return f"TimedSchedule(round_every_s={self.seconds!r}, warmup_steps={self.warmup_steps})"


class Event(IntEnum):
    """Something that happens at the end of a step, in the order a step's events are run."""

    WARMUP_ROUND = 0  #: a synchronous warmup step: average (unless DDP all-reduced the gradients)
    WARMUP_END = 1  #: the last warmup step: Local SGD (and the outer loop) starts from here
    GLOBAL_ROUND = 2  #: a scheduled round over the whole group
    LOCAL_ROUND = 3  #: a hierarchical round within the local group
    LAND = 4  #: an overlapped round launched ``overlap_steps`` ago is applied


_NONE: tuple[Event, ...] = ()


class Cursor:
    """All of *when*: advanced once per ``step()``, it returns that step's events.

    Everything is a pure function of the step count (and the schedule), as in torch's
    ``HierarchicalModelAverager``: a global round takes precedence over a local one, and an
    overlapped round lands ``overlap_steps`` after it was launched. :meth:`seek` puts the
    cursor at any step, which is how a resumed run continues the schedule exactly.

    Args:
        schedule: the global rounds (and warmup); a :class:`FragmentSchedule` for streaming rounds.
        local_k: hierarchical rounds every ``local_k`` steps after warmup (0: none).
        overlap_steps: rounds land this many steps after they were launched (0: blocking).
    """

    __slots__ = ("schedule", "local_k", "overlap_steps", "step", "origin", "rounds", "_next_round", "_land_at")
    unit = "step"  #: what :attr:`position` counts

    def __init__(self, schedule: Schedule | FragmentSchedule, local_k: int = 0, overlap_steps: int = 0) -> None:
        self.schedule = schedule
        self.local_k = local_k
        self.overlap_steps = overlap_steps
        self.seek(0)

    def seek(self, step: int) -> None:
        """Continue from ``step`` (steps already taken), replaying the schedule up to it.

        ``origin`` remembers it: the count this run started or resumed from, which every rank
        must share (their rounds are out of phase otherwise).
        """
        self.step = self.origin = step
        self.rounds = 0  # global rounds after warmup, up to ``step``
        last, nxt = None, self.schedule.next_round(0)
        while nxt <= step:
            last, nxt = nxt, self.schedule.next_round(nxt)
            self.rounds += 1
        self._next_round = nxt
        self._land_at = -1
        if self.overlap_steps and last is not None and last + self.overlap_steps > step:
            self._land_at = last + self.overlap_steps

    @property
    def position(self) -> int:
        """What every rank shares at a round: the step count (a :class:`TimedCursor`: the round count)."""
        return self.step

    @property
    def position_origin(self) -> int:
        """:attr:`position` when this run started or resumed."""
        return self.origin

    @property
    def origins(self) -> tuple[int, ...]:
        """What :attr:`position_origin` is made of (a heal hands the donor's to the joiner)."""
        return (self.origin,)

    @origins.setter
    def origins(self, value: tuple[int, ...]) -> None:
        (self.origin,) = value

    def may_round_next(self) -> bool:
        """Whether the next step may end with a global round."""
        return self.step + 1 >= self._next_round

    def round_done(self) -> None:
        """A round completed (a step-counted schedule needs no note of it)."""

    def spent(self) -> float:
        """Seconds spent in a time-budgeted period (a step-counted schedule has none: 0)."""
        return 0.0

    def fragment(self) -> int:
        """The fragment the round at the current step syncs (streaming rounds: a function of the step)."""
        return self.schedule.fragment_at(self.step)  # type: ignore[union-attr]

    def save(self, entry: dict[str, Any]) -> None:
        """Put what :meth:`seek` needs beyond the step count into a checkpoint's entry (nothing: the
        schedule derives the rest from the step count)."""

    def parse(self, entry: Any) -> tuple:
        """What :meth:`save` put in ``entry``, checked, as :meth:`seek`'s arguments after the step count."""
        return ()

    def pause(self) -> None:
        """Stop a time-budgeted period's clock (a step-counted schedule has none)."""

    def resume(self) -> None:
        """Restart the clock :meth:`pause` stopped."""

    @property
    def landing(self) -> int | None:
        """The step at which the overlapped round in flight lands, if one is."""
        return self._land_at if self._land_at > self.step else None

    def landed(self) -> None:
        """The round in flight landed early (``LocalSGDOptimizer.land()``): none is in flight any more."""
        self._land_at = -1

    def advance(self) -> tuple[Event, ...]:
        """Count one step and return its events (an empty tuple on most steps: a few int compares)."""
        self.step = step = self.step + 1
        warmup = self.schedule.warmup_steps
        if step <= warmup:
            return (Event.WARMUP_ROUND, Event.WARMUP_END) if step == warmup else (Event.WARMUP_ROUND,)
        if step == self._next_round:
            nxt = self.schedule.next_round(step)
            if self.overlap_steps:
                if step + self.overlap_steps >= nxt:
                    raise ValueError(
                        f"overlap_steps={self.overlap_steps} must be smaller than the period: the round "
                        f"launched at step {step} would still be in flight at the next one"
                    )
                self._land_at = step + self.overlap_steps
            self._next_round = nxt
            self.rounds += 1
            return (Event.GLOBAL_ROUND,)
        if step == self._land_at:
            return (Event.LAND,)
        if self.local_k and (step - warmup) % self.local_k == 0:
            return (Event.LOCAL_ROUND,)
        return _NONE

    def events(self, until: int) -> list[tuple[int, Event]]:
        """Every (step, event) from the current step up to ``until``, advancing the cursor."""
        out = []
        while self.step < until:
            events = self.advance()
            out += [(self.step, e) for e in events]
        return out


class TimedCursor(Cursor):
    """The cursor of a :class:`TimedSchedule`: a step ends with a round once the period's time is spent.

    Each replica decides from its own clock, so no step needs a collective: every replica takes
    its ``n``-th round as its ``n``-th, and the control collective compares round counts
    (:attr:`position`) instead of step counts. A period's clock runs from the end of the last
    round or of warmup (:meth:`round_done`), from binding (the optimizer calls :meth:`round_done`
    then: a collective, so every replica starts together), or from :meth:`seek` (a resume); a
    checkpoint carries the time already spent in the period (:meth:`spent`), so a resumed run
    continues the period instead of restarting it.

    Args:
        schedule: the time budget and warmup.
        clock: seconds, monotonic (default: :func:`time.monotonic`); a test may pass a clock of its own.
        fragments: streaming rounds: each fragment syncs once per ``seconds``, in turn (fragment 0
            first), so a round falls every ``seconds / fragments``.
    """

    __slots__ = ("clock", "fragments", "agree", "rounds_origin", "_started", "_carried", "_pauses")
    unit = "round"

    def __init__(self, schedule: TimedSchedule, clock: Callable[[], float] = time.monotonic,
                 fragments: int = 1, overlap_steps: int = 0) -> None:
        self.clock, self.fragments = clock, fragments
        #: sharded replicas: ``agree(due)`` says whether any rank of this replica's is due (a collective
        #: within the replica at every step after warmup), so all its ranks round at the same step
        self.agree: Callable[[bool], bool] | None = None
        super().__init__(schedule, overlap_steps=overlap_steps)

    def fragment(self) -> int:
        return (self.rounds - 1) % self.fragments  # (the current round is counted already)

    def seek(self, step: int, rounds: int = 0, spent: float = 0.0, land_at: int = -1) -> None:  # type: ignore[override]
        """Continue from ``step`` steps and ``rounds`` time-budgeted rounds, ``spent`` seconds into a
        period (the period's clock runs on from now), with the round in flight landing at step
        ``land_at`` (-1: none is)."""
        self.step = self.origin = step
        self.rounds = self.rounds_origin = rounds
        self._land_at = land_at if self.overlap_steps else -1
        self._next_round = -1  # never a step count: the clock decides
        self._started, self._carried, self._pauses = self.clock(), float(spent), 0

    def save(self, entry: dict[str, Any]) -> None:
        entry["rounds"], entry["period_spent_s"] = self.rounds, self.spent()

    def parse(self, entry: Any) -> tuple[int, float, int]:
        """The round count, the seconds spent in the period and the landing step of a round in
        flight (-1: none; its entry was checked by the round) of a checkpoint's entry, checked.

        An entry saved with step-counted rounds has neither count nor time: the count starts at 0
        (a warning says so, as the period itself changes meaning), and the period starts afresh.
        """
        entry = entry if isinstance(entry, dict) else {}
        in_flight = entry.get("in_flight")
        land_at = in_flight["apply_at"] if isinstance(in_flight, dict) and "apply_at" in in_flight else -1
        if "rounds" not in entry:
            if entry:
                warnings.warn("The checkpoint was saved with rounds every k steps; with round_every_s the round "
                              "count (num_rounds) starts at 0 from here", UserWarning, stacklevel=4)
            return 0, 0.0, land_at
        rounds, spent = entry["rounds"], entry.get("period_spent_s", 0.0)
        if isinstance(rounds, torch.Tensor) and rounds.numel() == 1:
            rounds = int(rounds.item())
        if isinstance(spent, torch.Tensor) and spent.numel() == 1:
            spent = float(spent.item())
        if not _is_int(rounds) or rounds < 0:
            raise ValueError(f"state_dict['local_sgd']['rounds'] must be an integer >= 0, got {rounds!r}")
        if isinstance(spent, bool) or not isinstance(spent, numbers.Real) or not (math.isfinite(spent) and spent >= 0):
            raise ValueError(f"state_dict['local_sgd']['period_spent_s'] must be a finite number >= 0, got {spent!r}")
        return int(rounds), float(spent), land_at

    @property
    def position(self) -> int:
        """Warmup steps plus rounds since: what every replica shares at a round, whatever its step count."""
        return min(self.step, self.schedule.warmup_steps) + self.rounds

    @property
    def position_origin(self) -> int:
        return min(self.origin, self.schedule.warmup_steps) + self.rounds_origin

    @property
    def origins(self) -> tuple[int, ...]:
        return self.origin, self.rounds_origin

    @origins.setter
    def origins(self, value: tuple[int, ...]) -> None:
        self.origin, self.rounds_origin = value

    def spent(self) -> float:
        """Seconds spent in the current period (while paused: until the pause; 0 during warmup)."""
        if self.step < self.schedule.warmup_steps:
            return 0.0
        if self._pauses:
            return self._carried
        return self._carried + (self.clock() - self._started)

    def round_done(self) -> None:
        """A scheduled round completed, warmup ended, or the optimizer bound: the next period starts now,
        on every replica alike (they all leave the collective together). ``sync()`` does not restart it."""
        if self.step >= self.schedule.warmup_steps:
            self._started, self._carried = self.clock(), 0.0

    def may_round_next(self) -> bool:
        return True  # the clock decides at the end of the step

    def pause(self) -> None:
        """Stop the period's clock until the matching :meth:`resume` (pauses nest): the time spent is kept."""
        if not self._pauses:
            self._carried = self.spent()
        self._pauses += 1

    def resume(self) -> None:
        self._pauses -= 1
        if not self._pauses:
            self._started = self.clock()

    def advance(self) -> tuple[Event, ...]:
        self.step = step = self.step + 1
        warmup = self.schedule.warmup_steps
        if step <= warmup:
            return (Event.WARMUP_ROUND, Event.WARMUP_END) if step == warmup else (Event.WARMUP_ROUND,)
        in_flight = self._land_at >= step  # an overlapped round launched before, not landed yet
        due = self.spent() >= self.schedule.seconds / self.fragments  # type: ignore[attr-defined]
        if self.agree is not None:
            due = self.agree(due)
        if not due:
            return (Event.LAND,) if step == self._land_at else _NONE
        self.rounds += 1
        if not self.overlap_steps:
            return (Event.GLOBAL_ROUND,)
        self._land_at = step + self.overlap_steps  # the round in flight (if any) lands before this one goes out
        return (Event.LAND, Event.GLOBAL_ROUND) if in_flight else (Event.GLOBAL_ROUND,)
