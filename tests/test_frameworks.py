"""Accelerate and PyTorch Lightning, the real packages in real multi-process CPU runs.

Each scenario is a script under tests/scripts run the way users run it (torchrun for
Accelerate; Lightning launches its own DDP processes). The oracle is the same training
written as a bare loop, checked elsewhere against the per-parameter reference.
"""

from __future__ import annotations

import sys

import pytest
import torch

from helpers import ROOT, run

SCRIPTS = ROOT / "tests" / "scripts"


def test_accelerate_prepare_accumulate_and_scheduler_match_the_bare_loop(tmp_path):
    pytest.importorskip("accelerate", reason="install the integrations extra: pip install -e '.[integrations]'")
    out = tmp_path / "result.pt"
    run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", str(SCRIPTS / "accelerate_loop.py"),
         str(out)])
    ranks = torch.load(out, weights_only=True)
    assert len(ranks) == 2
    for r in ranks:
        # 24 micro-batches per rank, accumulated 2 per step: K counts the 12 optimizer steps
        assert r["acc_steps"] == r["bare_steps"] == r["acc_state"] == 12
        assert r["equal"], "Accelerate's run differs from the bare loop"
        assert r["acc_lrs"] == r["bare_lrs"] and r["acc_lrs"][-1] < r["acc_lrs"][0]  # the scheduler stepped
    # the last round was at step 10: two local steps since, so the replicas differ (DDP did not sync)
    assert ranks[0]["acc_params"] != ranks[1]["acc_params"]


def test_lightning_ddp_trains_like_the_bare_loop_and_resumes_exactly(tmp_path):
    pytest.importorskip("pytorch_lightning", reason="install the integrations extra: pip install -e '.[integrations]'")
    for phase in ("full", "first", "resume"):  # 3 epochs; 1 epoch + checkpoint; resume it to 3
        run([sys.executable, str(SCRIPTS / "lightning_loop.py"), str(tmp_path), phase])
    load = lambda name: torch.load(tmp_path / name, weights_only=True)  # noqa: E731
    full = [load(f"full_rank{r}.pt") for r in (0, 1)]
    resumed = [load(f"resume_rank{r}.pt") for r in (0, 1)]
    assert [load(f"first_rank{r}.pt")["num_steps"] for r in (0, 1)] == [10, 10]  # saved mid-period (k=4)
    for rank in (0, 1):
        assert full[rank]["num_steps"] == resumed[rank]["num_steps"] == 30
        for ours, bare in zip(full[rank]["params"], full[rank]["bare"]):
            torch.testing.assert_close(ours, bare, rtol=0, atol=0)
        for uninterrupted, after_resume in zip(full[rank]["params"], resumed[rank]["params"]):
            torch.testing.assert_close(after_resume, uninterrupted, rtol=0, atol=0)
    # 30 steps, k=4: two local steps since the last round, so the replicas differ (DDP did not sync)
    assert not all(torch.equal(a, b) for a, b in zip(full[0]["params"], full[1]["params"]))
