"""Reliability: a rank that dies mid-run is detected at the next averaging round, and a job
restarted by ``torchrun --max-restarts`` resumes from its checkpoints bit for bit.

These tests start their own processes: killing a rank would break the shared pool of
``conftest.py``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Sequence

import pytest
import torch

from helpers import CHARLM, ROOT, TEARDOWN_ABORT
from workers import process_context

PG_TIMEOUT_S = 10.0  # the process group's timeout: a dead rank is reported well within it, a hung one at it
FAIL_AFTER_STEP = 6  # the last rank SIGKILLs (or SIGSTOPs) itself after this step ...
K = 4  # ... so the survivors fail at the averaging round of step 8
WALL_LIMIT_S = 60.0


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _failing_rank_worker(rank: int, world_size: int, store: str, out_dir: str, how: str) -> None:
    """Train with Local SGD; after step 6 the last rank dies (SIGKILL) or hangs (SIGSTOP).

    The other ranks write what they saw to ``rank{r}.json``.
    """
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist

    from helpers import make_batches, make_model, mse
    from localsgd_optim import AveragingRoundError, LocalSGDOptimizer

    torch.set_num_threads(1)
    out = Path(out_dir)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=PG_TIMEOUT_S))
    model = make_model()
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), k=K)
    result: dict = {"rank": rank, "steps_done": 0}
    try:
        for step, (x, y) in enumerate(make_batches(3 * K, rank), start=1):
            opt.zero_grad()
            mse(model(x), y).backward()
            opt.step()
            result["steps_done"] = step
            if rank == world_size - 1 and step == FAIL_AFTER_STEP:
                _write_json(out / "failed.json", {"rank": rank, "time": time.time()})
                os.kill(os.getpid(), getattr(signal, how))
        result["outcome"] = "finished"  # a survivor must never get here
    except AveragingRoundError as e:
        cause = e.__cause__
        result.update(outcome="AveragingRoundError", message=str(e), detected=time.time(),
                      cause_type=f"{type(cause).__module__}.{type(cause).__qualname__}",
                      cause_mro=[c.__qualname__ for c in type(cause).__mro__])
    except BaseException as e:  # noqa: BLE001 - anything else is a finding: report it exactly
        result.update(outcome=f"{type(e).__module__}.{type(e).__qualname__}", message=str(e),
                      detected=time.time(), mro=[c.__qualname__ for c in type(e).__mro__],
                      traceback=traceback.format_exc())
    _write_json(out / f"rank{rank}.json", result)
    # Tearing down a group whose peer is gone is not under test (it works: destroy_process_group
    # returns at once); leave without it, so nothing here can hang.
    os._exit(0)


@pytest.mark.parametrize("how, world_size", [("SIGKILL", 2), ("SIGKILL", 3), ("SIGSTOP", 2)],
                         ids=["dead-2ranks", "dead-3ranks", "hung-2ranks"])
def test_failed_rank_raises_averaging_round_error_naming_the_round(how, world_size, tmp_path):
    """The last rank dies (or hangs) after step 6: every other rank raises AveragingRoundError
    "at step 8", the next round, at once for a dead rank and at the group's timeout for a hung one."""
    ctx = process_context()
    procs = [ctx.Process(target=_failing_rank_worker,
                         args=(r, world_size, str(tmp_path / "store"), str(tmp_path), how))
             for r in range(world_size)]
    last = world_size - 1
    t0 = time.monotonic()
    try:
        for p in procs:
            p.start()
        for p in procs[:last]:
            p.join(timeout=max(1.0, WALL_LIMIT_S - (time.monotonic() - t0)))
        wall = time.monotonic() - t0
        hung = [r for r, p in enumerate(procs[:last]) if p.is_alive()]
        assert not hung, f"ranks {hung} still running after {wall:.1f}s: a {how}ed rank made them hang"
        procs[last].join(timeout=0 if how == "SIGSTOP" else 5)
        if how == "SIGKILL":
            assert procs[last].exitcode == -signal.SIGKILL, f"rank {last}: exit code {procs[last].exitcode}"
        else:
            assert procs[last].is_alive()  # still stopped: the others gave up on it by themselves
    finally:
        for p in procs:  # never leave orphans behind, whatever failed above
            if p.is_alive():
                p.kill()  # SIGKILL also ends a stopped process
                p.join(timeout=5)

    failed = json.loads((tmp_path / "failed.json").read_text())
    assert failed["rank"] == last and not (tmp_path / f"rank{last}.json").exists()
    report = []
    for r in range(last):
        assert procs[r].exitcode == 0, f"rank {r} exit code {procs[r].exitcode}"
        res = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert res["outcome"] == "AveragingRoundError", res
        assert f"a scheduled averaging round at step {2 * K} failed on rank {r} of {world_size}" in res["message"]
        assert res["steps_done"] == 2 * K - 1  # the inner update of step 8 ran; its round failed
        detection = res["detected"] - failed["time"]
        if how == "SIGKILL":  # gloo sees the closed connection at once
            assert detection < PG_TIMEOUT_S / 2, f"rank {r} took {detection:.2f}s to notice a dead peer"
        else:  # nothing is closed: the process group's timeout is what ends the wait
            assert PG_TIMEOUT_S - 1 < detection < PG_TIMEOUT_S + 10, f"rank {r}: {detection:.2f}s"
        report.append(f"rank {r}: {detection:.2f}s after the {how}, cause {res['cause_type']}")
    assert wall < WALL_LIMIT_S
    print(f"\n{how}, {world_size} ranks, whole test {wall:.1f}s; " + "; ".join(report))


# --standalone: c10d rendezvous on a free port (no clash with other torchrun jobs on 29500).
# TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: each attempt gets a fresh store. With the store that
# torchrun shares with its workers by default (static or c10d rendezvous), torch 2.13's restarted
# workers can read the dead attempt's gloo addresses, and init_process_group then fails
# ("connectFullMesh failed ... Connection refused") or hangs: 4 of 12 default restarts here, 6 of 12
# with --standalone alone, 0 of 14 with both settings.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
TORCHRUN_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
TORCHRUN_TIMEOUT_S = 120


def _torchrun(args: list[str], fresh: Sequence[Path] = ()) -> subprocess.CompletedProcess:
    """Run torchrun in its own session, so a timeout kills its workers too (no orphans).

    The one-retry rule of test_examples.py: only gloo's known teardown abort earns a retry.
    ``fresh`` files are deleted before each attempt, so a retry starts from scratch.
    """
    for attempt in range(2):
        for path in fresh:
            path.unlink(missing_ok=True)
        proc = subprocess.Popen([*TORCHRUN, *args], cwd=ROOT, env=TORCHRUN_ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=TORCHRUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            out, err = "", f"timed out after {TORCHRUN_TIMEOUT_S}s"
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # torchrun, its workers, anything they left
            except ProcessLookupError:
                pass
            proc.wait()
        if proc.returncode == 0 or TEARDOWN_ABORT not in err or attempt == 1:
            break
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_charlm_restarted_by_torchrun_after_a_dead_rank_matches_an_uninterrupted_run(tmp_path, charlm_uninterrupted):
    """--max-restarts=1 + per-rank checkpoints: a SIGKILLed rank costs a restart, not a bit of accuracy.
    (The uninterrupted run of CHARLM: the session's charlm_uninterrupted fixture, run once for several tests.)"""
    b_json, ck = tmp_path / "b.json", tmp_path / "ck"
    # The last rank dies at step 13; rank 0 fails at the round of step 16 (unless torchrun stops
    # it first); torchrun restarts both, and they resume from their checkpoints of step 8.
    ck.mkdir()
    done = _torchrun(["--max-restarts=1", *CHARLM, "--ckpt-dir", str(ck), "--ckpt-every", "8",
                      "--fail-at-step", "13", "--json-out", str(b_json)],
                     fresh=[b_json, ck / "rank0.pt", ck / "rank1.pt", ck / "failed-once"])
    out = done.stdout
    assert "killing this rank" in out and "at step 13" in out  # the fault really was injected ...
    assert (ck / "failed-once").exists()
    assert out.count("resumed from") == 1 and f"resumed from {ck} at step 8" in out  # ... and recovered
    a = charlm_uninterrupted
    b = json.loads(b_json.read_text())
    assert [h["step"] for h in a["history"]] == [h["step"] for h in b["history"]] == [12, 24]
    assert a["final_val_loss"] == b["final_val_loss"]  # same parameters => bit-identical loss
    assert a["history"][-1]["train_loss"] == b["history"][-1]["train_loss"]
    assert a["history"][0]["val_loss"] == b["history"][0]["val_loss"]  # step 12, redone after the resume


def test_charlm_resumes_at_another_world_size_from_consolidated_checkpoints(tmp_path):
    """A host gone for good: 3 ranks checkpoint at step 10 (mid-period), 2 ranks resume from their average."""
    ck, out_json = tmp_path / "ck", tmp_path / "b.json"
    three = [*TORCHRUN[:-1], "--nproc-per-node=3"]
    first = subprocess.run([*three, *CHARLM[:2], "10", *CHARLM[3:], "--ckpt-dir", str(ck), "--ckpt-every", "10"],
                           cwd=ROOT, env=TORCHRUN_ENV, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert sorted(p.name for p in ck.glob("rank*.pt")) == ["rank0.pt", "rank1.pt", "rank2.pt"]
    done = _torchrun([*CHARLM, "--ckpt-dir", str(ck), "--ckpt-every", "12", "--json-out", str(out_json)])
    assert f"resumed from {ck} at step 10 (saved by 3 ranks: their average)" in done.stdout
    result = json.loads(out_json.read_text())
    assert result["world_size"] == 2 and [h["step"] for h in result["history"]] == [12, 24]
    assert math.isfinite(result["final_val_loss"])
    # The new world's checkpoints say so: the next restart loads them one per rank.
    assert torch.load(ck / "rank0.pt", weights_only=True)["world_size"] == 2
