"""The convergence study's tuning logic (examples/tune_study.py) on a synthetic loss surface.

Training runs are what the main-job tests cover; here each "run" returns a known function of
its settings, so the bracketing, the DiLoCo outer search, the seed passes and the report can
be checked exactly, in milliseconds. Reuse of finished runs is checked with real files.
"""

from __future__ import annotations

import json
import math
import sys

import pytest

from helpers import ROOT

sys.path.insert(0, str(ROOT / "examples"))
import convergence_study  # noqa: E402
import tune_study  # noqa: E402

BEST = {"ddp": 0.012, "localsgd_k8": 0.006, "diloco_k64": 0.048}


def synthetic(name, lr, seed, outer):
    """Convex in log2(lr) with the minimum at BEST[name]; DiLoCo best at outer (0.5, 0.9)."""
    loss = 1.0 + 0.01 * math.log2(lr / BEST[name]) ** 2 + 0.001 * seed
    if outer is not None:
        loss += 0.02 * abs(outer[0] - 0.5) + 0.03 * (outer[1] != 0.9)
    return {"final_val_loss": loss, "samples_per_s": 100.0, "history": []}


@pytest.fixture
def sweep(monkeypatch, tmp_path):
    """The real Sweep (tags, reuse, command lines); only the training run is synthetic."""
    calls = []

    def run_logged(cmd, log, json_out, env=None):
        flag = lambda name, cast=float: cast(cmd[cmd.index(name) + 1]) if name in cmd else None  # noqa: E731
        name = json_out.name[:json_out.name.index("_lr")]
        outer = (flag("--outer-lr"), flag("--outer-momentum")) if "--outer-lr" in cmd else None
        call = (name, flag("--lr"), flag("--seed", int), outer)
        calls.append(call)
        result = synthetic(*call)
        json_out.write_text(json.dumps(result))  # what a real run leaves: reused from then on
        return result

    monkeypatch.setattr(tune_study, "run_logged", run_logged)
    monkeypatch.setattr(tune_study, "TUNED", list(BEST))
    args = convergence_study.parse_args(["--tune", "--no-plots", "--out", str(tmp_path), "--seeds", "3"])
    return args, calls, tmp_path


def test_tune_brackets_each_best_lr_searches_the_outer_optimizer_and_seeds(sweep):
    args, calls, out = sweep
    tune_study.tune(args, convergence_study.METHODS)
    report = json.loads((out / "tuned.json").read_text())
    assert report["steps"] == 2000 and report["world_size"] == 4
    for name, best in BEST.items():
        entry = report["methods"][name]
        assert entry["best_lr"] == best
        lrs = sorted(float(lr) for lr in entry["lrs"])
        assert len(lrs) >= 4 and lrs[0] < best < lrs[-1]  # at least 4 values, bracketing the best
        assert all(b == 2 * a for a, b in zip(lrs, lrs[1:]))  # a x2 grid
        assert entry["seeds"] == 3 and len(entry["final_val_loss_per_seed"]) == 3
        assert entry["final_val_loss"] == pytest.approx(1.001)  # seeds 0, 1, 2 at the optimum
    assert report["methods"]["diloco_k64"]["best_outer"] == {"lr": 0.5, "momentum": 0.9, "nesterov": True}
    # 0.048 is past the starting grid's edge (0.024): the grid was widened to bracket it.
    assert ("diloco_k64", 0.096, 0, (0.7, 0.9)) in calls
    # The outer search: every outer lr at momentum 0.9, then momentum 0.5 at the best outer lr only.
    outer = {c[3] for c in calls if c[0] == "diloco_k64" and c[1] == 0.048 and c[2] == 0}
    assert outer == {(0.3, 0.9), (0.5, 0.9), (0.7, 0.9), (1.0, 0.9), (0.5, 0.5)}
    # Two passes: every method got seed 1 before any got seed 2.
    seeds = [(c[0], c[2]) for c in calls if c[2] > 0]
    last_seed1 = max(i for i, s in enumerate(seeds) if s[1] == 1)
    first_seed2 = min(i for i, s in enumerate(seeds) if s[1] == 2)
    assert last_seed1 < first_seed2
    table = (out / "tuned.md").read_text()
    assert "| DDP (gradient all-reduce every step) | 0.012 | - | 1.0010 ± 0.0010 (3 seeds) | +0.00% |" in table


def test_tune_resumes_from_the_runs_already_done(sweep):
    args, calls, out = sweep
    tune_study.tune(args, convergence_study.METHODS)
    assert len(calls) == len(set(calls))  # nothing ran twice, across both seed passes
    first = (out / "tuned.json").read_text()
    calls.clear()
    tune_study.tune(args, convergence_study.METHODS)  # a restarted sweep: every result is on disk
    assert calls == [] and (out / "tuned.json").read_text() == first
