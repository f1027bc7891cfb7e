"""Hosts lost and relaunched, three ways: ours under torchft, torchft's own DiLoCo, our restart path.

    python benchmarks/ft/live_membership.py [--period 30] [--down 5] [--duration 150]

One run, on this machine. The same model (examples/train_charlm.py's defaults: 2 layers,
d_model 128, context 64; here batch 4 per replica group), DiLoCo with k=8 (inner AdamW lr 3e-3,
outer Nesterov SGD lr 0.7, momentum 0.9), 2 replica groups, ``--step-delay`` seconds of sleep per
step (a CPU run that leaves the CPU idle part of the time, as a GPU job does), and the same
failure schedule for the three setups:

* **ours+torchft**: ``train_charlm.py --ft --method diloco``, one process per replica group,
  torchft's lighthouse (``--heartbeat_timeout_ms``, ``--quorum_tick_ms 100``,
  ``--join_timeout_ms 10000``, ``--min_replicas 1``);
* **torchft DiLoCo**: ``torchft_diloco.py`` beside this file: ``torchft.local_sgd.DiLoCo`` on the
  same model, data layout, optimizers and lighthouse;
* **ours, restart**: ``train_charlm.py --elastic --method diloco`` under two torchrun agents
  (``--nnodes 1:2``, c10d rendezvous on localhost, agent 0 hosting the store,
  ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``), as tests/test_elastic.py runs them.

The failure: every ``--period`` seconds from group 0's first step, replica group 1 (its process;
on the restart path its agent and worker) is killed with SIGKILL, and relaunched ``--down``
seconds later, as many times as fit in ``--duration`` with 15 s to spare. Each setup also runs
once without failures (``--baseline-steps``), and ours+torchft and torchft's DiLoCo once on the
48x128 model (``--layers 48 --d-model 128``: 9.5M parameters in 582 tensors, 576 of them in the
blocks) for the round's cost. Every process logs a record per step (``charlm_timed.py`` wraps
train_charlm; ``probes.py``).

What each number means:

* **stall**: for each failure, the longest time the survivor (group 0; on the restart path, host
  0's workers, whichever process) went between two consecutive steps, over the gaps that end
  after the kill and before the next kill (or the end), minus its normal step time (the median
  gap of the failure-free run). Goal (issue 32): at most the heartbeat timeout plus one round.
* **heal**: from the kill, and from the relaunch, to the relaunched group's first committed
  round: under torchft, its first record with a committed round (ours joins a round inside
  ``Managed.start()``, before its first step; torchft's DiLoCo heals at its first sync, after k
  steps); on the restart path, its first step that ends a round (step % k == 0). "Of which" is
  the part until the relaunched group's new process has started and imported torch (on the
  restart path: until torchrun's rendezvous let the new worker start).
* **useful replica-steps**: inner steps that the final model contains. Under torchft, a step
  counts if the round that closes its period committed on that replica and did not heal it (a
  heal overwrites the steps). On the restart path, a step counts unless the next attempt to
  start after it resumed from an earlier checkpoint (it was redone).
* **lost replica-steps**: steps taken that did not count.
* **step efficiency** = useful replica-steps / (G x R x W), with G = 2 replica groups, R = the
  setup's own failure-free step rate per replica (steps/s of group 0 in its failure-free run;
  a second row uses 1 / its median step instead, which leaves rounds out: a survivor alone in
  its quorum pays little for its rounds, so a setup with costly rounds gains from a failure on
  the first row)
  and W = the wall time from the survivor's first step to its last. torchft's published
  reference: 82.3% with a failure a minute on 300 GPUs.
* **round time**: on the 48x128 model, failure-free: the median duration of a step that runs a
  round minus the median duration of one that does not (quorum, collectives, outer step).
* **collectives per round**: the median number of collective calls on torchft's process group
  during a step that runs a round (every all-reduce, all-gather, broadcast, barrier...; the
  counting subclass of ``torchft.ProcessGroupGloo`` is in ``probes.py``).
* **digests equal**: the final parameters' sha256 of group 0 and of the last group 1 (restart
  path: train_charlm's own ``replicas_identical``).

Writes the printed table to ``--out``/study.md and every number (with each event's) to
``--out``/study.json; the processes' logs stay in ``--work``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SETTLE_S = 15.0  #: the last relaunch comes at least this long before the end of --duration
BIG = ["--layers", "48", "--d-model", "128", "--context", "16", "--batch-size", "2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """Replica groups (or hosts) of one training job: start one, kill one, wait for the end."""

    def __init__(self, work: Path, argv: list[str]) -> None:
        self.work, self.argv = work, argv
        self.procs: dict[int, list[subprocess.Popen]] = {}
        work.mkdir(parents=True)

    def popen(self, group: int, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        n = len(self.procs.setdefault(group, []))
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                                stdout=open(self.work / f"g{group}-{n}.log", "w"), stderr=subprocess.STDOUT)
        self.procs[group].append(proc)
        return proc

    def pids(self, group: int) -> list[int]:
        return [self.procs[group][-1].pid]

    def kill(self, group: int) -> None:
        for pid in self.pids(group):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def finish(self, timeout: float) -> bool:
        """Waits for the last process of every group; False if one is still running at ``timeout``."""
        deadline = time.time() + timeout
        try:
            for procs in self.procs.values():
                procs[-1].wait(timeout=max(1.0, deadline - time.time()))
            return True
        except subprocess.TimeoutExpired:
            return False

    def close(self) -> None:
        for group, procs in self.procs.items():
            if procs[-1].poll() is None:
                self.kill(group)


class TorchftJob(Job):
    """One process per replica group, and torchft's lighthouse."""

    def __init__(self, work: Path, argv: list[str], script: str, heartbeat_ms: int) -> None:
        super().__init__(work, argv)
        self.script, port = script, free_port()
        self.lighthouse = subprocess.Popen(
            ["torchft_lighthouse", "--min_replicas", "1", "--quorum_tick_ms", "100", "--join_timeout_ms", "10000",
             "--heartbeat_timeout_ms", str(heartbeat_ms), "--bind", f"[::]:{port}"],
            stdout=open(work / "lighthouse.log", "w"), stderr=subprocess.STDOUT)
        self.env = {"TORCHFT_LIGHTHOUSE": f"http://localhost:{port}"}
        time.sleep(1)

    def start(self, group: int) -> None:
        n = len(self.procs.get(group, []))
        self.popen(group, [sys.executable, str(HERE / self.script), "--step-log", str(self.work / "steps"),
                           *self.argv, "--json-out", str(self.work / f"g{group}-{n}.json")],
                   {**self.env, "REPLICA_GROUP_ID": str(group)})

    def close(self) -> None:
        super().close()
        self.lighthouse.kill()
        self.lighthouse.wait()


class TorchrunJob(Job):
    """One torchrun agent per host (``--nnodes 1:2``), as tests/test_elastic.py runs them."""

    def __init__(self, work: Path, argv: list[str]) -> None:
        super().__init__(work, argv)
        self.port = free_port()

    def start(self, host: int) -> None:
        self.popen(host, [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2", "--nproc-per-node", "1",
                          "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{self.port}", "--rdzv-id", "study",
                          "--rdzv-conf", f"is_host={int(host == 0)},last_call_timeout=1", "--max-restarts", "100",
                          "--monitor-interval", "0.5", str(HERE / "charlm_timed.py"),
                          "--step-log", str(self.work / "steps"), *self.argv, "--elastic",
                          "--ckpt-dir", str(self.work / "ck"), "--json-out", str(self.work / "out.json")],
                   {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "STUDY_HOST": str(host)})

    def pids(self, host: int) -> list[int]:
        """A host: its agent first (it would restart a killed worker), then its workers."""
        agent = self.procs[host][-1].pid
        kids = subprocess.run(["pgrep", "-P", str(agent)], capture_output=True, text=True).stdout.split()
        return [agent, *map(int, kids)]


@dataclass
class Proc:
    """One process's step log."""

    group: int
    begin: float
    steps: list[dict[str, Any]] = field(default_factory=list)
    joined: dict[str, Any] | None = None


def read_logs(directory: Path) -> list[Proc]:
    procs = []
    for path in sorted(directory.glob("*.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        proc = Proc(records[0]["group"], records[0]["t"])
        for r in records[1:]:
            if r["kind"] == "step":
                proc.steps.append(r)
            elif r["kind"] == "joined":
                proc.joined = r
        procs.append(proc)
    return sorted(procs, key=lambda p: p.begin)


def survivor_times(procs: list[Proc]) -> list[float]:
    return sorted(r["t"] for p in procs if p.group == 0 for r in p.steps)


def first_step_time(directory: Path, timeout: float) -> float:
    """Waits for group 0's first step; its time."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if directory.exists():
            times = survivor_times(read_logs(directory))
            if times:
                return times[0]
        time.sleep(0.2)
    raise SystemExit(f"no step of group 0 within {timeout:.0f} s: see the logs in {directory.parent}")


def counters(record: dict[str, Any]) -> tuple[int, int, int]:
    return record["commits"], record["rollbacks"], record["heals"]


def rounds(proc: Proc) -> list[tuple[int, dict[str, Any], dict[str, Any]]]:
    """(index, record before, record) of each step of a torchft process that ran a round: its
    counters changed (a commit, an undo or a heal)."""
    previous = [proc.joined or {"commits": 0, "rollbacks": 0, "heals": 0}, *proc.steps]
    return [(i, a, b) for i, (a, b) in enumerate(zip(previous, proc.steps)) if counters(a) != counters(b)]


def useful_torchft(procs: list[Proc]) -> int:
    """Steps whose period's round committed on their replica without healing it."""
    useful = 0
    for p in procs:
        start = 0  # the period's first step
        for i, before, after in rounds(p):
            if after["commits"] > before["commits"] and after["heals"] == before["heals"]:
                useful += i + 1 - start
            start = i + 1
    return useful


def useful_restart(procs: list[Proc]) -> int:
    """Steps not redone: at or before the step that the next attempt to start after them resumed from."""
    started = sorted((p.steps[0]["t"], p.steps[0]["step"] - 1) for p in procs if p.steps)
    useful = 0
    for p in procs:
        if not p.steps:
            continue
        later = [resume for t, resume in started if t > p.steps[-1]["t"]]
        limit = later[0] if later else math.inf
        useful += sum(1 for r in p.steps if r["step"] <= limit)
    return useful


def step_rate(procs: list[Proc]) -> tuple[float, float]:
    """Group 0's steps per second and median gap between steps (a failure-free run)."""
    times = survivor_times(procs)
    gaps = [b - a for a, b in zip(times, times[1:])]
    return (len(times) - 1) / (times[-1] - times[0]), statistics.median(gaps)


def round_cost(procs: list[Proc], restart: bool, k: int) -> dict[str, float | None]:
    """Group 0's round: median step time with a round minus without, and collectives per round."""
    steps = next(p for p in procs if p.group == 0).steps
    with_round = {i for i, r in enumerate(steps) if r["step"] % k == 0} if restart else \
        {i for i, _, _ in rounds(Proc(0, 0.0, steps))}
    durations = {i: steps[i]["t"] - steps[i - 1]["t"] for i in range(1, len(steps))}
    plain = statistics.median(d for i, d in durations.items() if i not in with_round)
    calls = [] if restart else [steps[i]["collectives"] - steps[i - 1]["collectives"] for i in with_round if i]
    return {"round_s": statistics.median(d for i, d in durations.items() if i in with_round) - plain,
            "step_s": plain, "collectives_per_round": statistics.median(calls) if calls else None}


@dataclass
class Setup:
    key: str  #: its name in --setups and its folder under --work
    name: str
    make: Callable[[Path, list[str]], Job]
    restart: bool = False


def setups(heartbeat_ms: int) -> list[Setup]:
    return [Setup("ours_ft", "ours+torchft", lambda w, a: TorchftJob(w, ["--ft", *a], "charlm_timed.py", heartbeat_ms)),
            Setup("torchft", "torchft DiLoCo", lambda w, a: TorchftJob(w, a, "torchft_diloco.py", heartbeat_ms)),
            Setup("restart", "ours, torchrun restart", lambda w, a: TorchrunJob(w, a), restart=True)]


def run(setup: Setup, work: Path, argv: list[str], groups: int, events: list[float], down: float,
        timeout: float) -> dict[str, Any]:
    """Starts the job; kills group 1 at each of ``events`` (seconds after group 0's first step) and
    relaunches it ``down`` s later; waits for the end. The kill and relaunch times, and the logs."""
    job = setup.make(work, argv)
    kills, relaunches = [], []
    try:
        for g in range(groups):
            job.start(g)
        t0 = first_step_time(work / "steps", 300)  # (a loaded machine starts slowly)
        for at in events:
            time.sleep(max(0.0, t0 + at - time.time()))
            job.kill(1)
            kills.append(time.time())
            time.sleep(down)
            job.start(1)
            relaunches.append(time.time())
        finished = job.finish(timeout)
    finally:
        job.close()
    return {"finished": finished, "kills": kills, "relaunches": relaunches, "procs": read_logs(work / "steps")}


def digests(work: Path, restart: bool) -> bool | None:
    if restart:
        out = work / "out.json"
        return json.loads(out.read_text()).get("replicas_identical") if out.exists() else None
    outs = [json.loads(p.read_text()) for p in sorted(work.glob("g*-*.json"), key=lambda p: p.stat().st_mtime)]
    last = {o["replica_group"]: o["param_digest"] for o in outs}
    return len(last) > 1 and len(set(last.values())) == 1


def analyse(setup: Setup, base: dict[str, Any], failing: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The numbers of one setup (see the module's docstring)."""
    rate, normal = step_rate(base["procs"])
    procs, kills, relaunches = failing["procs"], failing["kills"], failing["relaunches"]
    times = survivor_times(procs)
    gaps = [(b, b - a) for a, b in zip(times, times[1:])]
    events = []
    for i, (kill, back) in enumerate(zip(kills, relaunches)):
        until = kills[i + 1] if i + 1 < len(kills) else math.inf
        stall = max((gap for end, gap in gaps if kill < end <= until), default=math.nan) - normal
        joiners = [p for p in procs if p.group == 1 and back <= p.begin < until]
        if setup.restart:
            healed = [r["t"] for p in joiners for r in p.steps if r["step"] % args.k == 0]
        else:
            healed = [r["t"] for p in joiners for r in ([p.joined] if p.joined else []) + p.steps if r["commits"]]
        at = min(healed, default=math.nan)
        events.append({"kill": kill, "relaunch": back, "stall_s": stall, "heal_from_kill_s": at - kill,
                       "heal_from_relaunch_s": at - back,
                       "process_start_s": min((p.begin for p in joiners), default=math.nan) - back})
    useful = useful_restart(procs) if setup.restart else useful_torchft(procs)
    taken = sum(len(p.steps) for p in procs)
    wall = times[-1] - times[0]
    survivor = [p for p in procs if p.group == 0]
    return {"finished": failing["finished"], "failures": len(kills), "normal_step_s": normal,
            "failure_free_steps_per_s": rate, "wall_s": wall, "useful_replica_steps": useful,
            "lost_replica_steps": taken - useful, "step_efficiency": useful / (args.groups * rate * wall),
            "step_efficiency_median": useful * normal / (args.groups * wall),
            "useful_replica_steps_per_s": useful / wall,
            "rounds_committed_survivor": None if setup.restart else sum(p.steps[-1]["commits"] for p in survivor),
            "rounds_undone_survivor": None if setup.restart else sum(p.steps[-1]["rollbacks"] for p in survivor),
            "digests_equal": digests(args.work / setup.key / "failures", setup.restart),
            "round_small": round_cost(base["procs"], setup.restart, args.k), "events": events}


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else math.nan


def table(results: dict[str, dict[str, Any]], big: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    names = list(results)
    goal = args.heartbeat_ms / 1e3 + max(r["round_small"]["round_s"] for r in results.values() if r)

    def row(label: str, cell: Callable[[dict[str, Any]], str]) -> str:
        return f"| {label} | " + " | ".join(cell(results[n]) for n in names) + " |"

    def events(key: str) -> Callable[[dict[str, Any]], str]:
        return lambda r: (f"{median([e[key] for e in r['events']]):.1f} (" +
                          ", ".join(f"{e[key]:.1f}" for e in r["events"]) + ")")

    lines = [f"failure: group 1 of {args.groups} SIGKILLed every {args.period:.0f} s from group 0's first step, "
             f"relaunched {args.down:.0f} s later; DiLoCo k={args.k}, 2x128 model, batch {args.batch_size}, "
             f"--step-delay {args.step_delay}; lighthouse heartbeat timeout {args.heartbeat_ms} ms",
             "",
             "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|",
             row("failures", lambda r: str(r["failures"]) + ("" if r["finished"] else " (did not finish)")),
             row("normal step, failure-free (ms)", lambda r: f"{1e3 * r['normal_step_s']:.0f}"),
             row(f"survivor's stall per failure, s: median (each); goal <= {goal:.1f}", events("stall_s")),
             row("heal from the kill, s: median (each)", events("heal_from_kill_s")),
             row("heal from the relaunch, s: median (each)", events("heal_from_relaunch_s")),
             row("of which: relaunch to the group's new process up (imports done), s", events("process_start_s")),
             row("useful / lost replica-steps", lambda r: f"{r['useful_replica_steps']} / {r['lost_replica_steps']}"),
             row("useful replica-steps per s (failure-free: G x rate)",
                 lambda r: f"{r['useful_replica_steps_per_s']:.1f} "
                           f"({args.groups * r['failure_free_steps_per_s']:.1f})"),
             row("**step efficiency**", lambda r: f"**{r['step_efficiency']:.1%}**"),
             row("step efficiency against the median failure-free step (rounds left out)",
                 lambda r: f"{r['step_efficiency_median']:.1%}"),
             row("survivor's rounds committed / undone",
                 lambda r: "-" if r["rounds_committed_survivor"] is None
                 else f"{r['rounds_committed_survivor']} / {r['rounds_undone_survivor']}"),
             row("final parameters equal across replicas", lambda r: str(r["digests_equal"])),
             "",
             "Round on the 48x128 model (" + " ".join(BIG) + "), failure-free, 2 groups:",
             "",
             "| | round time (ms) | collectives per round | step without a round (ms) |", "|---|---|---|---|"]
    for name, r in big.items():
        lines.append(f"| {name} | {1e3 * r['round_s']:.0f} | {r['collectives_per_round']:.0f} | "
                     f"{1e3 * r['step_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--period", type=float, default=30.0, metavar="T", help="seconds between kills of group 1")
    p.add_argument("--down", type=float, default=5.0, metavar="D", help="seconds from a kill to the relaunch")
    p.add_argument("--duration", type=float, default=150.0, help="seconds of failures (the run's intended length)")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--groups", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--step-delay", type=float, default=0.03)
    p.add_argument("--baseline-steps", type=int, default=200, help="steps of each failure-free run")
    p.add_argument("--big-steps", type=int, default=40, help="steps of each 48x128 run")
    p.add_argument("--heartbeat-ms", type=int, default=2000, help="the lighthouse's heartbeat timeout")
    p.add_argument("--setups", default="ours_ft,torchft,restart",
                   help="which setups, comma-separated (default: all three)")
    p.add_argument("--out", type=Path, default=HERE, help="where study.md and study.json go")
    p.add_argument("--work", type=Path, default=None, help="where the processes' logs go (default: a new temp dir)")
    args = p.parse_args(argv)
    args.work = args.work or Path(tempfile.mkdtemp(prefix="live-membership-"))
    chosen = set(args.setups.split(","))
    common = ["--method", "diloco", "--k", str(args.k), "--batch-size", str(args.batch_size),
              "--step-delay", str(args.step_delay), "--eval-batches", "2"]
    n_events = max(0, int((args.duration - args.down - SETTLE_S) // args.period))
    events = [args.period * (i + 1) for i in range(n_events)]
    print(f"logs in {args.work}", flush=True)
    results, big = {}, {}
    for setup in setups(args.heartbeat_ms):
        if setup.key not in chosen:
            continue
        work = args.work / setup.key
        steps = args.baseline_steps // args.k * args.k
        base = run(setup, work / "failure-free", [*common, "--steps", str(steps), "--eval-every", str(steps)],
                   args.groups, [], args.down, 300)
        rate, _ = step_rate(base["procs"])
        steps = math.ceil(args.duration * rate / args.k) * args.k
        print(f"{setup.name}: failure-free {rate:.1f} steps/s; {steps} steps with {n_events} failures", flush=True)
        failing = run(setup, work / "failures", [*common, "--steps", str(steps), "--eval-every", str(steps)],
                      args.groups, events, args.down, 4 * args.duration + 300)
        results[setup.name] = analyse(setup, base, failing, args)
        if not setup.restart:
            steps = args.big_steps // args.k * args.k
            run48 = run(setup, work / "48x128", [*common, *BIG, "--step-delay", "0", "--steps", str(steps),
                                                 "--eval-every", str(steps)], args.groups, [], args.down, 600)
            big[setup.name] = round_cost(run48["procs"], False, args.k)
        print(json.dumps({setup.name: {key: value for key, value in results[setup.name].items() if key != "events"}},
                         default=str), flush=True)
    text = table(results, big, args)
    print(text, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "study.md").write_text(f"`python benchmarks/ft/live_membership.py {' '.join(argv or sys.argv[1:])}`\n\n"
                                       f"{text}\n")
    (args.out / "study.json").write_text(json.dumps({"config": {key: str(value) for key, value in vars(args).items()},
                                                     "setups": results, "round_48x128": big}, indent=1))


if __name__ == "__main__":
    main()
