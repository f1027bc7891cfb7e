"""The frontier study's logic (examples/frontier_study.py) on synthetic runs: which runs it makes,
in which order, what it reuses from the tuned study, and the frontier.json it writes."""

from __future__ import annotations

import json
import sys

import pytest

from helpers import ROOT

sys.path.insert(0, str(ROOT / "examples"))
import convergence_study  # noqa: E402
import frontier_study  # noqa: E402
import tune_study  # noqa: E402

DDP_MB = 2000 * 1_000_000 * 4 / 2**20
# name -> (final loss at lr 0.012, MB sent per rank)
SYNTH = {"localsgd_k8_topk3": (1.05, DDP_MB * 0.005), "localsgd_k8_int2": (1.01, DDP_MB * 0.008),
         "localsgd_k8_int8": (1.00, DDP_MB * 0.03)}


@pytest.fixture
def study(monkeypatch, tmp_path):
    calls = []

    def run_logged(cmd, log, json_out, env=None):
        flag = lambda name, cast=float: cast(cmd[cmd.index(name) + 1])  # noqa: E731
        name = json_out.name[:json_out.name.index("_lr")]
        lr, seed = flag("--lr"), flag("--seed", int)
        calls.append((name, lr, seed))
        loss, mb = SYNTH[name]
        result = {"final_val_loss": loss + 0.01 * seed + (lr - 0.012), "steps": 2000, "params": 1_000_000,
                  "samples_per_s": 1.0, "history": [], "communication": {"mb_sent": mb}}
        json_out.write_text(json.dumps(result))
        return result

    monkeypatch.setattr(tune_study, "run_logged", run_logged)
    monkeypatch.setattr(frontier_study, "FRONTIER", ["ddp", "localsgd_k8", *SYNTH])
    (tmp_path / "tune").mkdir()
    tuned = {"steps": 2000, "world_size": 4, "methods": {}}
    for name, loss, mb in [("ddp", 1.0, None), ("localsgd_k8", 1.02, DDP_MB / 8)]:
        tuned["methods"][name] = {"label": name, "best_lr": 0.012, "seeds": 2,
                                  "lrs": {"0.012": [loss, loss + 0.01]}}
        for seed in range(2):
            run = {"final_val_loss": loss + 0.01 * seed, "steps": 2000, "params": 1_000_000, "history": [],
                   "communication": None if mb is None else {"mb_sent": mb}}
            (tmp_path / "tune" / f"{name}_lr0.012_s{seed}.json").write_text(json.dumps(run))
    (tmp_path / "tuned.json").write_text(json.dumps(tuned))
    return calls, tmp_path


def test_frontier_runs_new_methods_then_seeds_in_order_of_promise(study):
    calls, out = study
    convergence_study.main(["--frontier", "--no-plots", "--out", str(out), "--frontier-lrs", "0.006,0.012"])
    first = [c for c in calls if c[2] == 0]
    assert sorted(first) == sorted((n, lr, 0) for n in SYNTH for lr in (0.006, 0.012))  # tuned ones reused
    seeds = [c for c in calls if c[2] == 1]
    # within 1% of DDP's bytes first (int2 before topk3: lower loss), then the rest; each at its best lr
    assert seeds == [("localsgd_k8_int2", 0.006, 1), ("localsgd_k8_topk3", 0.006, 1), ("localsgd_k8_int8", 0.006, 1)]
    report = json.loads((out / "frontier.json").read_text())
    assert report["ddp_mb"] == pytest.approx(DDP_MB)
    assert report["ddp_loss"] == pytest.approx(1.005)
    int2 = report["methods"]["localsgd_k8_int2"]
    assert int2["final_val_loss"] == pytest.approx([1.004, 1.014])
    assert int2["share_of_ddp_bytes"] == pytest.approx(0.008)
    assert int2["vs_ddp_pct"] == pytest.approx(100 * (1.009 / 1.005 - 1))
    assert int2["settings"]["flags"][-2:] == ["--compression", "int2"] and int2["best_lr"] == 0.006
    assert report["methods"]["localsgd_k8"]["settings"]["reused_from_tuned"]
    table = (out / "frontier.md").read_text()
    assert "| Local SGD k=8, 2-bit + EF | 61.0 | 0.80% | 0.006 | 1.0090 ± 0.0071 (2 seeds) | +0.40% | yes |" in table


def test_frontier_report_uses_only_runs_on_disk(study):
    calls, out = study
    convergence_study.main(["--frontier", "--report", "--no-plots", "--out", str(out)])
    assert calls == []
    report = json.loads((out / "frontier.json").read_text())
    assert sorted(report["methods"]) == ["ddp", "localsgd_k8"]
