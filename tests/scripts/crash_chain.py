"""Kill ranks of an ElasticCheckpoint run at every point of its save protocol, several attempts in a row.

One *attempt* is one run of the job: ``world`` real gloo processes that resume from the newest
complete checkpoint step and train a small DiLoCo model (k=2), saving after every round. A fault
kills one rank with ``os._exit`` at a named point of a save at or after a given step: before its
temporary file, after it (written, not renamed), after the rename, or while rank 0 deletes old
steps. The other ranks then fail in their next collective, as a host's peers do. Each attempt
trains on data of its own (seeded by its token), so a replayed step is never bit-identical to
the first time: a resume that mixed two attempts' files would show.

Every rank logs, as ground truth, a digest of what it hands to each ``save`` and of what it
loaded at its ``resume``. :func:`check_chain` then asserts, for every attempt after the first:

- every rank resumed from the same step of the same attempt, and loaded exactly what that
  attempt's rank saved there (never another attempt's file);
- no more than one round was lost: the resumed step is at least the last step at which every
  rank of an earlier attempt had called ``save``, minus ``k``, and never older than an earlier
  resume.

The suite runs one fixed chain (``tests/test_elastic_protocol.py``, ``python tests/scripts/crash_chain.py suite --root D``);
``python tests/scripts/crash_chain.py chains --chains 20`` runs 20 chains of random faults in a row.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

K, STEPS = 2, 16
POINTS = ("before_tmp", "after_tmp", "after_rename", "retention")
FAULT_RC = 77


def _digest(model: Any, opt: Any) -> str:
    h = hashlib.sha256()
    tensors = list(model.state_dict().values())
    tensors += opt.state_dict()["local_sgd"].get("outer", {}).get("global", [])
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def worker(args: argparse.Namespace) -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from torch import nn

    from localsgd_optim import LocalSGDOptimizer, diloco
    from localsgd_optim.elastic import ElasticCheckpoint

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank,
                            world_size=args.world, timeout=timedelta(seconds=30))
    rank, truth = args.rank, Path(args.truth)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 2))
    opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), k=K, outer_optimizer=diloco())
    ckpt = ElasticCheckpoint(args.dir, keep=args.keep)
    if args.fault:
        f_rank, f_step, f_point = args.fault.split(":")
        if int(f_rank) == rank:
            def fault(point: str) -> None:
                if point == f_point and ckpt._writing_step >= int(f_step):
                    os._exit(FAULT_RC)
            ckpt._fault = fault

    def log(name: str, record: dict[str, Any]) -> None:
        (truth / f"{args.label}.{name}.r{rank}.json").write_text(json.dumps(record))

    resumed = ckpt.resume(model, opt)
    start = resumed.step if resumed is not None else 0
    log("resume", {"attempt": ckpt.attempt, "step": start, "from": resumed.attempt if resumed else None,
                   "digest": _digest(model, opt)})
    seed = int(hashlib.sha256(f"{ckpt.attempt}/{rank}".encode()).hexdigest()[:8], 16)
    g = torch.Generator().manual_seed(seed)
    for step in range(start + 1, STEPS + 1):
        x, y = torch.randn(16, 8, generator=g), torch.randn(16, 2, generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if step % K == 0:  # right after a round
            log(f"save{step}", {"attempt": ckpt.attempt, "digest": _digest(model, opt)})
            ckpt.save(step, model, opt, extra={"step": step})
    ckpt.close()
    log("final", {"attempt": ckpt.attempt, "digest": _digest(model, opt)})
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exit_like_the_interpreter(code: int) -> None:
    """A forked child's end: join the non-daemon threads, as interpreter shutdown does, then exit."""
    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon:
            t.join()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)


def run_attempt(directory: Path, truth: Path, label: int, fault: str | None, world: int = 2,
                keep: int = 1, timeout: float = 90.0) -> list[int]:
    """One attempt: ``world`` processes forked from this one (torch imported once, no op run yet here).

    Returns their exit codes (``FAULT_RC`` for the killed one).
    """
    port, pids = _free_port(), []
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                worker(argparse.Namespace(dir=str(directory), truth=str(truth), label=label, rank=rank,
                                          world=world, port=port, keep=keep, fault=fault))
            except BaseException:  # noqa: BLE001 - a peer died: this rank's collective fails, as on a host
                code = 1
            _exit_like_the_interpreter(code)
        pids.append(pid)
    deadline, codes = time.time() + timeout, {}
    while len(codes) < world:
        for pid in pids:
            if pid not in codes:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done == pid:
                    codes[pid] = os.waitstatus_to_exitcode(status)
        if time.time() > deadline:
            for pid in pids:
                if pid not in codes:
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    return [codes[pid] for pid in pids]


def _read(truth: Path, label: int, name: str, world: int) -> list[dict[str, Any]] | None:
    files = [truth / f"{label}.{name}.r{r}.json" for r in range(world)]
    return [json.loads(f.read_text()) for f in files] if all(f.exists() for f in files) else None


def check_chain(truth: Path, attempts: int, world: int = 2) -> list[str]:
    """Assert the invariants above over ``attempts`` logged attempts; one summary line per attempt."""
    saved: dict[tuple[str, int, int], str] = {}  # (attempt token, step, rank) -> digest handed to save
    lines, floor, token_of = [], 0, {}
    for label in range(attempts):
        resume = _read(truth, label, "resume", world)
        assert resume is not None, f"attempt {label}: not every rank got as far as its resume"
        tokens = {r["attempt"] for r in resume}
        assert len(tokens) == 1, f"attempt {label}: ranks disagree on the attempt token {tokens}"
        token_of[label] = tokens.pop()
        steps, sources = {r["step"] for r in resume}, {r["from"] for r in resume}
        assert len(steps) == 1 and len(sources) == 1, f"attempt {label}: ranks resumed differently: {resume}"
        step, source = steps.pop(), sources.pop()
        if step:
            assert source in token_of.values() and source != token_of[label], (label, source)
            for rank, r in enumerate(resume):
                want = saved.get((source, step, rank))
                assert r["digest"] == want, (
                    f"attempt {label}, rank {rank}: loaded step {step} of attempt {source}, but that is not what "
                    f"that attempt's rank {rank} saved ({r['digest']} vs {want}): files of two attempts were mixed")
        assert step >= floor, f"attempt {label} resumed at step {step}, more than one round before {floor + K}"
        all_saved = [s for s in range(K, STEPS + 1, K) if _read(truth, label, f"save{s}", world) is not None]
        for s in range(K, STEPS + 1, K):
            for rank in range(world):
                f = truth / f"{label}.save{s}.r{rank}.json"
                if f.exists():
                    saved[(token_of[label], s, rank)] = json.loads(f.read_text())["digest"]
        floor = max([step] + [max(all_saved) - K] if all_saved else [step])
        final = _read(truth, label, "final", world)
        lines.append(f"attempt {label}: resumed at step {step}"
                     + (f" (from attempt {list(token_of.values()).index(source)})" if step else "")
                     + f", every rank saved up to step {max(all_saved) if all_saved else '-'}"
                     + (", finished" if final else ""))
        if final is not None:
            assert len({f["digest"] for f in final}) == 1, f"attempt {label}: the replicas differ at the end"
    return lines


#: the suite's chain: each point of the protocol, attempts in a row (the second repeats the review's
#: repro: rank 1 died before its rename, then rank 0 dies at the same step of the replay)
SUITE_CHAIN = ["1:8:after_tmp", "0:8:before_tmp", "0:10:after_rename", "0:12:retention", "1:14:before_tmp", None]


def run_chain(root: Path, faults: list[str | None], world: int = 2, strict: bool = True) -> list[str]:
    """Run the attempts; ``strict``: every fault must fire (a random one may come after the last save)."""
    directory, truth = root / "ck", root / "truth"
    truth.mkdir(parents=True, exist_ok=True)
    fired = []
    for label, fault in enumerate(faults):
        codes = run_attempt(directory, truth, label, fault, world)
        if fault is None or (not strict and codes == [0] * world):
            assert codes == [0] * world, f"attempt {label} (no fault) exited with {codes}"
        else:
            assert FAULT_RC in codes, f"attempt {label}: the fault {fault} never fired (exit codes {codes})"
        fired.append(FAULT_RC in codes)
    lines = check_chain(truth, len(faults), world)
    return [line + ("" if f or fault is None else f" (its fault {fault} did not fire)")
            for line, f, fault in zip(lines, fired, faults)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd")
    c = sub.add_parser("chains")
    c.add_argument("--chains", type=int, default=20)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--root", default="crash_chains")
    s = sub.add_parser("suite")
    s.add_argument("--root", required=True)
    args = parser.parse_args()
    import localsgd_optim.elastic  # noqa: F401 - imported once here; every attempt's ranks are forked from this process

    if args.cmd == "suite":
        for line in run_chain(Path(args.root), SUITE_CHAIN):
            print(line, flush=True)
        return
    rng = random.Random(args.seed)
    for i in range(args.chains):
        faults = [f"{rng.randrange(2)}:{rng.randrange(K, STEPS, K)}:{rng.choice(POINTS)}" for _ in range(4)]
        faults = [f if not f.endswith("retention") else "0" + f[1:] for f in faults] + [None]
        start = time.time()
        lines = run_chain(Path(args.root) / f"chain{i}", faults, strict=False)
        print(f"chain {i + 1}/{args.chains} passed in {time.time() - start:.1f} s, faults {faults[:-1]}:", flush=True)
        for line in lines:
            print("  " + line, flush=True)


if __name__ == "__main__":
    main()
