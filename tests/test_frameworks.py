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
    for phase in ("full", "resume"):  # 3 epochs, checkpointed after the first; resume that checkpoint to 3
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


def test_hf_trainer_runs_local_sgd_like_the_bare_loop_and_resumes_exactly(tmp_path):
    pytest.importorskip("transformers", reason="install the integrations extra: pip install -e '.[integrations]'")
    run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", str(SCRIPTS / "hf_trainer_loop.py"),
         str(tmp_path)])
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for r in ranks:
        # The counter works: a plain Trainer all-reduces its single gradient bucket on each of 3 steps ...
        assert r["plain_allreduces"] == 3
        # ... and LocalSGDTrainer none: 10 local steps, rounds at steps 4 and 8, and train()'s final sync.
        assert r["local_allreduces"] == 0
        assert r["local_steps"] == 10 and r["local_rounds"] == 3 and r["fed"] == 10
        for ours, bare in zip(r["local_params"], r["bare_params"]):  # the very batches, as a bare loop
            torch.testing.assert_close(ours, bare, rtol=0, atol=0)
        # Resumed from step 6 (mid-period): 4 more batches, then bit for bit the uninterrupted run.
        assert r["resumed_steps"] == 10 and r["resumed_fed"] == 4
        for ours, resumed in zip(r["local_params"], r["resumed_params"]):
            torch.testing.assert_close(resumed, ours, rtol=0, atol=0)
        # 16 micro-batches, 2 per step: k counts the 8 optimizer steps. DDP all-reduces once per
        # warmup step (the last micro-batch), then never; one round at step 7 (3 + k), one final sync.
        assert r["accumulate_fed"] == 16 and r["accumulate_steps"] == 8
        assert r["warmup_allreduces"] == 3 and r["accumulate_rounds"] == 2
    for a, b in zip(ranks[0]["local_params"], ranks[1]["local_params"]):  # train() ends averaged
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Each rank's own state went into the checkpoint: mid-period the replicas differ.
    assert any(not torch.equal(a, b) for a, b in zip(ranks[0]["saved_own"].values(), ranks[1]["saved_own"].values()))


@pytest.mark.parametrize("kwargs,error,match", [
    ({}, TypeError, r"LocalSGDTrainer needs local_sgd=, the LocalSGDOptimizer arguments"),
    ({"local_sgd": 8}, TypeError, r"local_sgd must be a dict of LocalSGDOptimizer arguments, got int: 8"),
    ({"local_sgd": {"k": 8}, "local": True}, ValueError, r"local_sgd= was given but optimizers= already holds"),
])
def test_hf_trainer_refuses_unclear_optimizer_setup(tmp_path, kwargs, error, match):
    pytest.importorskip("transformers", reason="install the integrations extra: pip install -e '.[integrations]'")
    from transformers import TrainingArguments

    from localsgd_optim import LocalSGDOptimizer
    from localsgd_optim.transformers import LocalSGDTrainer

    model = torch.nn.Linear(2, 2)
    if kwargs.pop("local", False):
        kwargs["optimizers"] = (LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), k=2), None)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(error, match=match):
        LocalSGDTrainer(model=model, args=args, **kwargs)
