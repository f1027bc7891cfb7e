"""ElasticCheckpoint's save protocol: durable files, attempts never mixed, failures raised everywhere, exits flushed.

The crash chain (``tests/scripts/crash_chain.py``) kills a rank at each point of the protocol
over several attempts in a row and checks every resume against what each rank handed to
``save``; the rest test one rule each, on real gloo ranks where the rule is about ranks.
"""

from __future__ import annotations

import copy
import os
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from helpers import make_batches, make_model, train_wrapped
from localsgd_optim import LocalSGDOptimizer
from localsgd_optim.elastic import ElasticCheckpoint, complete_steps

SCRIPTS = Path(__file__).parent / "scripts"
ROOT = Path(__file__).parents[1]


def _run_python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_a_rank_killed_at_each_point_of_the_protocol_never_mixes_attempts_or_loses_two_rounds(tmp_path):
    """Six attempts in a row, five of them killed (before the temporary file, after it, after the
    rename, during retention). The second repeats the review's repro: an attempt leaves rank 0's
    step-8 file, the next leaves rank 1's; before attempts were named the third resumed from the
    two and the replicas never met again."""
    out = subprocess.run([sys.executable, str(SCRIPTS / "crash_chain.py"), "suite", "--root", str(tmp_path)],
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                             filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))))
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert len(lines) == 6 and lines[-1].endswith("finished"), out.stdout
    assert lines[2].startswith("attempt 2: resumed at step 6 (from attempt 0)"), out.stdout  # not step 8


def test_files_of_two_attempts_never_complete_a_step(tmp_path):
    mixed = tmp_path / "step-00000008.world-2"
    whole = tmp_path / "step-00000006.world-2"
    legacy = tmp_path / "step-00000004.world-2"  # written before attempts were named
    for d, names in ((mixed, ["rank0.18c-aa.pt", "rank1.18d-bb.pt", ".rank1.18c-aa.pt.tmp"]),
                     (whole, ["rank0.18c-aa.pt", "rank1.18c-aa.pt", "rank0.18d-bb.pt"]),
                     (legacy, ["rank0.pt", "rank1.pt"])):
        d.mkdir()
        for name in names:
            (d / name).write_bytes(b"")
    found = complete_steps(tmp_path)
    assert [(s.step, s.world, s.attempt) for s in found] == [(6, 2, "18c-aa"), (4, 2, "")]
    assert found[0].file(1) == whole / "rank1.18c-aa.pt" and found[1].file(0) == legacy / "rank0.pt"


def test_each_file_and_its_directory_are_fsynced_before_the_step_can_count(tmp_path, monkeypatch):
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(
        "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: calls.append("rename") or real_replace(a, b))
    model = make_model()
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), k=2)
    ElasticCheckpoint(tmp_path).save(2, model, opt, blocking=True)
    # the step's new directory entry, the file's bytes, then the rename, then the directory holding it
    assert calls == ["dir", "file", "rename", "dir"]


def test_resume_finishes_its_own_write_in_flight_first(tmp_path):
    model = make_model()
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), k=2)
    ckpt = ElasticCheckpoint(tmp_path)
    ckpt._fault = lambda point: time.sleep(0.5) if point == "after_tmp" else None
    ckpt.save(2, model, opt)
    resumed = ckpt.resume(make_model(seed=1), LocalSGDOptimizer(torch.optim.SGD(make_model().parameters()), k=2))
    assert resumed is not None and resumed.step == 2


_EXIT_WITHOUT_CLOSE = """
    import sys, torch
    from localsgd_optim import LocalSGDOptimizer
    from localsgd_optim.elastic import ElasticCheckpoint
    model = torch.nn.Linear(2048, 2048)  # 16 MB: still being written when the interpreter exits
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), k=2)
    ElasticCheckpoint(sys.argv[1]).save(2, model, opt)
    if sys.argv[2] == "raise":
        raise RuntimeError("the training loop failed after a save")
"""


@pytest.mark.parametrize("how", ["return", "raise"])
def test_a_process_that_exits_without_close_finishes_its_last_write(tmp_path, how):
    """Before: a daemon writer died with the interpreter: exit 134 ("terminate called without an active
    exception"), which torchrun takes for a crash, and only a .tmp file."""
    out = _run_python(_EXIT_WITHOUT_CLOSE, str(tmp_path), how)
    assert out.returncode == (0 if how == "return" else 1), out.stderr[-2000:]
    assert "terminate called" not in out.stderr
    found = complete_steps(tmp_path)
    assert [s.step for s in found] == [2] and not list(found[0].path.glob(".*.tmp"))
    state = torch.load(found[0].file(0), weights_only=True)
    assert state["train"]["model"]["weight"].shape == (2048, 2048)


def _save_extra(path: str, bad_rank: int, kind: str):
    import pathlib

    import numpy as np

    model = make_model()
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), k=2)
    bad = {"numpy_rng": np.random.get_state(), "numpy_scalar": np.float32(1.5),
           "path": pathlib.Path("/data/shard-3")}[kind]
    extra = {"position": 12, "rngs": {"torch": torch.get_rng_state()}}
    if dist.get_rank() == bad_rank:
        extra["rngs"][kind] = bad
    try:
        ElasticCheckpoint(path).save(2, model, opt, extra=extra)
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize("kind", ["numpy_rng", "numpy_scalar", "path"])
def test_save_refuses_an_extra_that_resume_could_not_load_on_every_rank(ranks2, tmp_path, kind):
    """Before: saved fine, and every resume then failed with UnpicklingError (weights_only)."""
    errors = ranks2(_save_extra, str(tmp_path), 1, kind)
    assert all(errors), errors
    assert f"extra['rngs']['{kind}']" in errors[1] and "rank(s) [1]" in errors[0], errors
    assert complete_steps(tmp_path) == [] and not any(tmp_path.rglob("*.pt"))


def _write_fails_on_rank1(path: str):
    model = make_model()
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), k=2)
    ckpt = ElasticCheckpoint(path)
    if dist.get_rank() == 1:
        def full_disk(point: str) -> None:
            if point == "after_tmp" and ckpt._writing_step == 2:
                raise OSError(28, "No space left on device")
        ckpt._fault = full_disk
    batches = make_batches(4)
    train_wrapped(model, opt, batches[:2])
    ckpt.save(2, model, opt)
    train_wrapped(model, opt, batches[2:])  # the round at step 4 waits for the write of step 2
    try:
        ckpt.save(4, model, opt)
    except RuntimeError as e:
        return str(e)
    return None


def test_a_failed_write_raises_on_every_rank_at_the_next_save(ranks2, tmp_path):
    """Before: only the failing rank raised; the others went on into the next round and waited there
    until the process group's timeout."""
    errors = ranks2(_write_fails_on_rank1, str(tmp_path))
    assert all(e and "step 2 failed on rank(s) [1]" in e for e in errors), errors
    assert "No space left on device" in errors[1]
    assert complete_steps(tmp_path) == []  # step 2 never counted, and step 4 was not written


def _round_waits_for_the_write(path: str):
    model = make_model()
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), k=2)
    ckpt = ElasticCheckpoint(path)
    release = threading.Event()  # the write of step 2 is held between its temporary file and the rename
    ckpt._fault = lambda point: release.wait(30) if point == "after_tmp" else None
    batches = make_batches(4)
    train_wrapped(model, opt, batches[:2])
    ckpt.save(2, model, opt)
    train_wrapped(model, opt, batches[2:3])
    during = [s.step for s in complete_steps(path)]  # step 3: no round, no wait: the write is still held
    threading.Timer(0.2, release.set).start()
    train_wrapped(model, opt, batches[3:])  # step 4's round: every rank's write of step 2 is done
    after = [s.step for s in complete_steps(path)]
    ckpt.close()
    return during, after


def test_the_next_round_waits_for_every_ranks_write(ranks2, tmp_path):
    """So a crash at any moment loses at most one round: when round S + k is done, step S is on disk."""
    for during, after in ranks2(_round_waits_for_the_write, str(tmp_path)):
        assert during == [] and after == [2]


def test_load_per_rank_reads_only_its_own_file_when_the_saved_world_is_known(tmp_path, monkeypatch):
    from localsgd_optim import checkpoint

    for r in range(3):
        torch.save({"world_size": 3, "w": torch.full((2,), float(r))}, tmp_path / f"rank{r}.pt")
    reads, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda f, **kw: reads.append(Path(f).name) or real_load(f, **kw))
    state, saved = checkpoint.load_per_rank(lambda r: tmp_path / f"rank{r}.pt", 2, 3, saved_world=3)
    assert saved == 3 and reads == ["rank2.pt"] and torch.equal(state["w"], torch.full((2,), 2.0))


def _resume_where_rank0_says(path: str):
    from localsgd_optim import elastic

    model = make_model()
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), k=2)
    ckpt = ElasticCheckpoint(path)
    ckpt.save(2, model, opt, blocking=True)
    ckpt.save(4, model, opt, blocking=True)
    if dist.get_rank() == 1:  # this host's view of a shared filesystem lags: it lists step 2 only
        elastic.complete_steps = lambda d: [s for s in complete_steps(d) if s.step == 2]
    try:
        return ElasticCheckpoint(path).resume(make_model(), LocalSGDOptimizer(
            torch.optim.SGD(make_model().parameters(), lr=0.1), k=2)).step
    finally:
        elastic.complete_steps = complete_steps


def test_every_rank_resumes_the_step_rank_0_chose(ranks2, tmp_path):
    """Before, each rank listed the directory itself: a lagging listing (or a write of another rank
    still in flight) made ranks resume different steps, or hang in a sharded load's collective."""
    assert ranks2(_resume_where_rank0_says, str(tmp_path)) == [4, 4]


def test_the_extra_check_never_raises_itself():
    from localsgd_optim.elastic import _unloadable

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError()  # an exception without a message

    assert _unloadable({"ok": 1, "x": Unpicklable()}).startswith("extra['x'] (Unpicklable: RuntimeError()")


def test_an_optimizer_with_a_write_in_flight_can_be_deep_copied(tmp_path):
    model = make_model()
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), k=2)
    ckpt = ElasticCheckpoint(tmp_path)
    release = threading.Event()
    ckpt._fault = lambda point: release.wait(30) if point == "after_tmp" else None
    ckpt.save(2, model, opt)
    twin = copy.deepcopy(opt)  # its step pre-hook holds the checkpoint, whose writer is running
    release.set()
    ckpt.close()
    assert twin.num_steps == opt.num_steps and [s.step for s in complete_steps(tmp_path)] == [2]
