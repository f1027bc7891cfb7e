"""The convergence study's tuning logic (examples/tune_study.py) on a synthetic loss surface.

Training runs are what the main-job tests cover; here each "run" returns a known function of
its settings, so the bracketing, the DiLoCo outer search, the seed passes and the report can
be checked exactly, in milliseconds. Reuse of finished runs is checked with real files.
"""

from __future__ import annotations

import json
import math
import re
import sys

import pytest

from helpers import ROOT

sys.path.insert(0, str(ROOT / "examples"))
import convergence_study  # noqa: E402
import tune_study  # noqa: E402

BEST = {"ddp": 0.012, "localsgd_k8": 0.006, "diloco_k64": 0.048}


def synthetic(name, lr, seed, outer):
    """Convex in log2(lr) with the minimum at BEST[name]; DiLoCo best at outer (0.5, 0.9)."""
    if name not in BEST:  # the gap-vs-k runs, localsgd_k<k>[_avgstate]: worse with k, best where localsgd_k8 is
        k = int(name[len("localsgd_k"):].removesuffix("_avgstate"))
        loss = 1.0 + (0.0005 if name.endswith("_avgstate") else 0.001) * k
        return {"final_val_loss": loss + 0.01 * math.log2(lr / BEST["localsgd_k8"]) ** 2, "samples_per_s": 100.0,
                "history": [], "communication": {"mb_sent": 800.0 / k}}
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
        result["steps"] = flag("--steps", int)  # longer runs end lower, DiLoCo's faster (the horizon study)
        result["final_val_loss"] *= (2000 / result["steps"]) ** (0.5 if name.startswith("diloco") else 0.25)
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


def test_gap_vs_k_reuses_the_tuned_runs_and_reports_each_k_against_ddp(sweep):
    args, calls, out = sweep
    tune_study.tune(args, convergence_study.METHODS)
    state = {"final_val_loss": 1.02}  # an AdamW-state-averaged k=8 run already on disk
    (out / "tune" / "localsgd_k8_avgstate_lr0.006_s0.json").write_text(json.dumps(state))
    calls.clear()
    tune_study.gap_vs_k(args, convergence_study.METHODS, [1, 2, 8], state_ks=(2,))
    # DDP and k=8 at Local SGD k=8's best lr (0.006), seed 0, were tuning runs: only k=1 and 2 ran,
    # and k=2 with the state averaged; k=8's averaged run was not asked for, but is on disk: shown.
    assert calls == [("localsgd_k1", 0.006, 0, None), ("localsgd_k2", 0.006, 0, None),
                     ("localsgd_k2_avgstate", 0.006, 0, None)]
    report = json.loads((out / "gap_vs_k.json").read_text())
    ddp = 1.0 + 0.01 * math.log2(0.006 / 0.012) ** 2  # DDP at that lr and seed, not DDP at its best
    assert report["lr"] == 0.006 and report["ddp_final_val_loss"] == pytest.approx(ddp)
    assert list(report["k"]) == ["1", "2", "8"]
    assert report["k"]["2"]["vs_ddp"] == pytest.approx(1.002 / ddp - 1)
    assert report["k"]["1"]["avgstate_vs_ddp"] is None
    assert report["k"]["2"]["mb_sent"] == 400.0
    assert report["k"]["2"]["avgstate_vs_ddp"] == pytest.approx(synthetic("localsgd_k2_avgstate", 0.006, 0, None)["final_val_loss"] / ddp - 1)
    assert report["k"]["8"]["vs_ddp"] == pytest.approx(1.0 / ddp - 1)  # the tuning run's loss, reused
    assert report["k"]["8"]["avgstate_vs_ddp"] == pytest.approx(1.02 / ddp - 1)
    assert f"| 1 | 1.0010 | {1.001 / ddp - 1:+.2%} | - | 800 |" in (out / "gap_vs_k.md").read_text()


def test_report_rewrites_the_results_so_far_and_runs_nothing(sweep, capsys):
    args, calls, out = sweep
    args.seeds = 2
    tune_study.tune(args, convergence_study.METHODS)  # the first pass only: 2 seeds everywhere
    (out / "tuned.json").unlink()
    calls.clear()
    args.seeds, args.report = 3, True
    for name in ("ddp", "diloco_k64"):  # the second pass has given these their third seed, not localsgd_k8
        tune_study.Sweep(args, convergence_study.METHODS).dir.joinpath(f"{name}_lr{BEST[name]:g}_s2" + (
            "_olr0.5_om0.9" if name == "diloco_k64" else "") + ".json").write_text(
                json.dumps(synthetic(name, BEST[name], 2, (0.5, 0.9) if name == "diloco_k64" else None)))
    tune_study.tune(args, convergence_study.METHODS)
    assert calls == []
    report = json.loads((out / "tuned.json").read_text())
    assert list(report["methods"]) == list(BEST)  # the first pass's entry stands in for the one not done
    assert {n: e["seeds"] for n, e in report["methods"].items()} == {"ddp": 3, "localsgd_k8": 2, "diloco_k64": 3}
    assert "--report: localsgd_k8: localsgd_k8_lr0.006_s2 has not run yet; kept its earlier entry" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--report"], "--report rewrites the tuning or frontier report: it needs --tune or --frontier"),
    (["--gap-vs-k", "1,8", "--tune"], "--gap-vs-k is a mode of its own"),
    (["--gap-vs-k", "1,8,"], "--gap-vs-k '1,8,': expected comma-separated positive integers"),
    (["--gap-vs-k", "0,8"], "--gap-vs-k '0,8': every value must be at least 1"),
    (["--gap-vs-k", "1,8", "--gap-state-ks", "64"], r"--gap-state-ks \[64\]: each k must also be in --gap-vs-k \(\[1, 8\]\)"),
    (["--gap-vs-steps", "1000", "--tune"], "--gap-vs-steps is a mode of its own"),
    (["--gap-vs-steps", "1000", "--gap-vs-k", "1,8"], "--gap-vs-steps is a mode of its own"),
    (["--gap-vs-steps", "0,1000"], "--gap-vs-steps '0,1000': every value must be at least 1"),
    (["--gap-state-ks", "8"], r"--gap-state-ks \[8\]: each k must also be in --gap-vs-k \(\[\]\)"),
])
def test_study_flags_bad_combinations_are_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        convergence_study.parse_args(argv)
    assert re.search(message, capsys.readouterr().err)


def test_gap_vs_k_without_a_tuned_local_sgd_says_what_to_run(tmp_path):
    args = convergence_study.parse_args(["--gap-vs-k", "1,8", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"has none yet for localsgd_k8: run `convergence_study.py --tune --only localsgd_k8` first"):
        tune_study.gap_vs_k(args, convergence_study.METHODS, args.gap_vs_k)


def test_gap_vs_steps_runs_each_length_at_the_tuned_settings(sweep):
    args, calls, out = sweep
    tune_study.tune(args, convergence_study.METHODS)
    calls.clear()
    horizon = convergence_study.parse_args(["--gap-vs-steps", "4000,1000,2000", "--no-plots", "--out", str(out)])
    assert horizon.gap_vs_steps == [1000, 2000, 4000] and horizon.horizon_names == ["localsgd_k8", "diloco_k64"]
    tune_study.gap_vs_steps(horizon, convergence_study.METHODS, horizon.gap_vs_steps, horizon.horizon_names)
    # Each at its tuned lr (DiLoCo at its tuned outer optimizer), seed 0; 2000 steps were tuning runs, reused.
    tuned = [("ddp", 0.012, 0, None), ("localsgd_k8", 0.006, 0, None), ("diloco_k64", 0.048, 0, (0.5, 0.9))]
    assert calls == tuned * 2
    for steps in (1000, 4000):  # the other lengths are kept apart, one folder per length
        runs = {f.name: json.loads(f.read_text())["steps"] for f in (out / "horizon" / f"steps{steps}").glob("*.json")}
        assert runs == {"ddp_lr0.012_s0.json": steps, "localsgd_k8_lr0.006_s0.json": steps,
                        "diloco_k64_lr0.048_s0_olr0.5_om0.9.json": steps}
    report = json.loads((out / "gap_vs_steps.json").read_text())
    assert report["settings"]["diloco_k64"] == {"lr": 0.048, "outer": [0.5, 0.9]}
    for steps in (1000, 2000, 4000):  # every method's optimum is 1.0; only the length moves them
        at = report["steps"][str(steps)]
        assert at["ddp_final_val_loss"] == pytest.approx((2000 / steps) ** 0.25)
        assert at["methods"]["localsgd_k8"]["vs_ddp"] == pytest.approx(0.0)
        assert at["methods"]["diloco_k64"]["vs_ddp"] == pytest.approx((2000 / steps) ** 0.25 - 1)
    assert f"| 1000 | {2 ** 0.25:.4f} | {2 ** 0.25:.4f} (+0.00%) | {2 ** 0.5:.4f} ({2 ** 0.25 - 1:+.2%}) |" in (
        out / "gap_vs_steps.md").read_text()


def test_gap_vs_steps_without_a_tuned_method_says_what_to_run(sweep):
    args, calls, out = sweep
    args.seeds = 2
    tune_study.tune(args, convergence_study.METHODS)
    horizon = convergence_study.parse_args(["--gap-vs-steps", "1000", "--only", "localsgd_k8,none", "--out", str(out)])
    assert horizon.horizon_names == ["localsgd_k8", "none"]
    with pytest.raises(SystemExit, match=r"has none yet for none: run `convergence_study.py --tune --only none` first"):
        tune_study.gap_vs_steps(horizon, convergence_study.METHODS, horizon.gap_vs_steps, horizon.horizon_names)
    assert not (out / "horizon").exists()  # checked before anything ran


def test_only_updates_its_methods_and_keeps_the_others(sweep):
    args, calls, out = sweep
    args.seeds = 2
    tune_study.tune(args, convergence_study.METHODS)
    calls.clear()
    only = convergence_study.parse_args(["--tune", "--no-plots", "--out", str(out), "--seeds", "3", "--only", "localsgd_k8"])
    tune_study.tune(only, convergence_study.METHODS)
    assert calls == [("ddp", 0.012, 2, None), ("localsgd_k8", 0.006, 2, None)]  # DDP, the reference, always runs
    report = json.loads((out / "tuned.json").read_text())
    assert list(report["methods"]) == list(BEST)  # in the order they were, DiLoCo's entry kept as it was
    assert {n: e["seeds"] for n, e in report["methods"].items()} == {"ddp": 3, "localsgd_k8": 3, "diloco_k64": 2}
