"""What a resize costs under torchrun's elastic agent: the time from a host's death (or a new host's
start) to the resized job's first step, and the steps redone.

    python benchmarks/elastic/restart_time.py [--repeats 3]

Runs the scenarios of tests/test_elastic.py (one rank per agent, c10d rendezvous on localhost,
TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, the main job with --elastic) and reads each attempt's start
from the sample log (an attempt's token is rank 0's time.time_ns() after init_process_group).
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from test_elastic import Hosts  # noqa: E402


def attempts(directory: Path) -> list[tuple[float, int]]:
    """(start time in s, first step) of every attempt, in order."""
    first: dict[int, int] = {}
    for f in directory.glob("rank0-*.txt"):
        for line in f.read_text().splitlines():
            token, step = map(int, line.split()[:2])
            first[token] = min(first.get(token, step), step)
    return sorted((token / 1e9, step) for token, step in first.items())


def shrink(tmp: Path) -> tuple[float, int]:
    with Hosts(tmp) as hosts:
        hosts.start(), hosts.start()
        doomed = hosts.start()
        hosts.wait_for_step(40)
        killed_at, saved = time.time(), hosts.saved()
        hosts.signal_host(doomed, signal.SIGKILL)
        hosts.finish()
    start, step = attempts(tmp / "samples")[-1]
    last_step_before = max(int(line.split()[1]) for f in (tmp / "samples").glob("rank0-*.txt")
                           for line in f.read_text().splitlines() if int(line.split()[0]) / 1e9 < start)
    return start - killed_at, last_step_before - (step - 1)


def grow(tmp: Path) -> tuple[float, int]:
    with Hosts(tmp, extra=("--step-delay", "0.05")) as hosts:
        hosts.start(), hosts.start()
        hosts.wait_for_step(20)
        joined_at = time.time()
        hosts.start()
        hosts.finish()
    start, step = attempts(tmp / "samples")[-1]
    last_step_before = max(int(line.split()[1]) for f in (tmp / "samples").glob("rank0-*.txt")
                           for line in f.read_text().splitlines() if int(line.split()[0]) / 1e9 < start)
    return start - joined_at, last_step_before - (step - 1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    for name, scenario in (("shrink 3 -> 2 (SIGKILL of a host)", shrink), ("grow 2 -> 3 (a third agent starts)", grow)):
        results = [scenario(Path(tempfile.mkdtemp(prefix="restart-"))) for _ in range(args.repeats)]
        times = [t for t, _ in results]
        print(f"{name}: event -> first step of the resized job {statistics.median(times):.1f} s median "
              f"({', '.join(f'{t:.1f}' for t in times)}); steps redone {[n for _, n in results]} (k=4)", flush=True)


if __name__ == "__main__":
    main()
