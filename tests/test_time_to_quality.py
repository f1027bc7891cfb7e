"""examples/time_to_quality.py's arithmetic on synthetic curves and timings.

The slow link and the training runs are what the two-host tests and the main-job tests cover;
here the link is never brought up and each "timing run" returns a known seconds-per-step, so
the crossing step, the wall time (warmup steps priced as DDP steps) and the ratio to DDP can be
checked exactly.
"""

from __future__ import annotations

import json
import sys

import pytest

from helpers import ROOT

sys.path.insert(0, str(ROOT / "examples"))
import time_to_quality  # noqa: E402

#: seconds per step over the link, per method, at the one rate used here
PER_STEP = {"ddp": 0.4, "localsgd_k8": 0.1, "localsgd_k32_warmup": 0.05}


def test_crossing_interpolates_between_evaluations():
    history = [{"step": 100, "val_loss": 2.0}, {"step": 200, "val_loss": 1.0}, {"step": 300, "val_loss": 0.5}]
    assert time_to_quality.crossing(history, 1.5) == 150.0
    assert time_to_quality.crossing(history, 0.75) == 250.0
    assert time_to_quality.crossing(history, 2.5) == 100.0  # already below at the first evaluation
    assert time_to_quality.crossing(history, 0.4) is None


def _curve(final: float) -> dict:
    """A straight fall from 2.0 at step 0 to ``final`` at step 2000, evaluated every 500."""
    return {"steps": 2000, "final_val_loss": final,
            "history": [{"step": s, "val_loss": 2.0 - (2.0 - final) * s / 2000} for s in range(500, 2001, 500)]}


@pytest.fixture
def study(monkeypatch, tmp_path):
    finals = {"ddp": 1.0, "localsgd_k8": 0.9, "localsgd_k32_warmup": 1.2, "none": 1.3}
    methods = {n: {"label": n, "best_lr": 0.01} for n in finals}
    (tmp_path / "tune").mkdir()
    for name, final in finals.items():
        (tmp_path / "tune" / f"{name}_lr0.01_s0.json").write_text(json.dumps(_curve(final)))
    (tmp_path / "tuned.json").write_text(json.dumps({"world_size": 4, "methods": methods}))
    timed = []

    def run_logged(cmd, log, json_out, env=None):
        name = json_out.name[:json_out.name.index("_100mbit")]
        timed.append(name)
        result = {"world_size": 4, "batch_size": 16, "samples_per_s": 4 * 16 / PER_STEP[name]}
        json_out.write_text(json.dumps(result))
        return result

    monkeypatch.setattr(time_to_quality, "can_make_namespaces", lambda: None)
    monkeypatch.setattr(time_to_quality, "run_logged", run_logged)
    monkeypatch.setattr(time_to_quality.subprocess, "run", lambda *a, **k: None)  # the link stays down
    argv = ["--rates", "100", "--no-plots", "--tuned", str(tmp_path / "tuned.json"), "--out", str(tmp_path / "ttq")]
    return argv, timed, tmp_path


def test_wall_time_to_ddps_final_loss_and_the_ratio(study):
    argv, timed, out = study
    time_to_quality.main(argv)
    assert sorted(timed) == sorted(PER_STEP)
    runs = {r["name"]: r for r in json.loads((out / "ttq" / "time_to_quality.json").read_text())["runs"]}
    assert runs["ddp"]["step_at_target"] == 2000 and runs["ddp"]["seconds_to_target"] == pytest.approx(800)
    # Local SGD's line falls 1.1 over 2000 steps: it reaches 1.0 at step 1818.18..., 0.1 s each.
    assert runs["localsgd_k8"]["step_at_target"] == pytest.approx(2000 / 1.1)
    assert runs["localsgd_k8"]["vs_ddp"] == pytest.approx(0.1 * 2000 / 1.1 / 800)
    # Never reaches DDP's loss; its 200 warmup steps cost DDP's 0.4 s, the other 1800 its own 0.05 s.
    assert runs["localsgd_k32_warmup"]["step_at_target"] is None
    assert runs["localsgd_k32_warmup"]["seconds_for_run"] == pytest.approx(200 * 0.4 + 1800 * 0.05)


def test_only_restricts_the_methods_and_names_unknown_ones(study):
    argv, timed, out = study
    time_to_quality.main(argv + ["--only", "localsgd_k8"])
    assert sorted(timed) == ["ddp", "localsgd_k8"]  # DDP, the reference, always
    for only in ("diloco_k8", "none"):
        with pytest.raises(SystemExit, match=rf"--only '{only}': \['{only}'\] cannot be timed; .* that can: \['ddp', "):
            time_to_quality.main(argv + ["--only", only])
    with pytest.raises(SystemExit, match=r"--long \['localsgd_k32_warmup'\]: not among the methods timed"):
        time_to_quality.main(argv + ["--only", "localsgd_k8", "--long", "localsgd_k32_warmup=4000"])
    assert sorted(timed) == ["ddp", "localsgd_k8"]  # both refused before anything ran
