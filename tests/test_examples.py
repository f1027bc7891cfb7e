"""The examples run under real torchrun, and the main job resumes from a checkpoint exactly."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from helpers import CHARLM, run, torchrun


def test_minimal_example_runs_and_ends_in_sync():
    out = torchrun("examples/minimal.py")
    assert "replicas identical after sync: True; averaging rounds: 25" in out


def test_charlm_resumes_exactly(tmp_path, charlm_uninterrupted):
    common = CHARLM  # (its uninterrupted run: the session's charlm_uninterrupted, run once for several tests)
    # a run that stops at step 14 after checkpointing at step 10 (mid-period for k=4) ...
    torchrun(*common, "--stop-at-step", "14", "--ckpt-dir", str(tmp_path / "ck"), "--ckpt-every", "10")
    # ... is restarted and resumes from step 10
    out = torchrun(*common, "--ckpt-dir", str(tmp_path / "ck"), "--ckpt-every", "10",
                   "--json-out", str(tmp_path / "b.json"))
    assert "resumed from" in out and "at step 10" in out  # steps 11..14 are redone from the checkpoint
    a = charlm_uninterrupted
    b = json.loads((tmp_path / "b.json").read_text())
    assert a["history"][-1]["step"] == b["history"][-1]["step"] == 24
    assert a["final_val_loss"] == b["final_val_loss"]  # same parameters => bit-identical loss
    assert a["history"][-1]["train_loss"] == b["history"][-1]["train_loss"]
    # the summary: k=4 sends a quarter of DDP's bytes (evaluation syncs excluded)
    comm = a["communication"]
    assert comm["rounds"] == 6 and comm["mb_sent"] == comm["ddp_mb"] / 4 and 0 < comm["round_share"] < 1
    assert b["communication"]["rounds"] == 4  # resumed at step 10: rounds at 12, 16, 20, 24


def test_charlm_sharded_replicas_resume_exactly_and_across_a_replica_change(tmp_path):
    """--shard 2: 2 replicas x 2 FSDP2 shards. A mid-period checkpoint resumes bit for bit at 4 ranks,
    and a run of 1 replica (2 ranks) resumes from the same files, consolidated per shard."""
    common = ["examples/train_charlm.py", "--shard", "2", "--steps", "16", "--k", "4", "--eval-every", "8",
              "--d-model", "32", "--layers", "2", "--max-bytes", "200000", "--eval-batches", "2"]
    out = torchrun(*common, "--json-out", str(tmp_path / "a.json"), nproc=4)
    assert "4 rank(s) as 2 replicas x 2 FSDP2 shards" in out
    torchrun(*common, "--stop-at-step", "10", "--ckpt-dir", str(tmp_path / "ck"), "--ckpt-every", "6", nproc=4)
    shutil.copytree(tmp_path / "ck", tmp_path / "ck3")
    out = torchrun(*common, "--ckpt-dir", str(tmp_path / "ck"), "--json-out", str(tmp_path / "b.json"), nproc=4)
    assert "resumed from" in out and "at step 6" in out
    a = json.loads((tmp_path / "a.json").read_text())
    b = json.loads((tmp_path / "b.json").read_text())
    assert a["final_val_loss"] == b["final_val_loss"] and a["history"][-1]["step"] == 16
    # each rank sends its shard: half of the model, k=4: an eighth of DDP's bytes
    assert a["communication"]["rounds"] == 4 and a["communication"]["mb_sent"] < a["communication"]["ddp_mb"] / 4
    out = torchrun(*common, "--ckpt-dir", str(tmp_path / "ck3"), "--json-out", str(tmp_path / "c.json"), nproc=2)
    assert "at step 6 (saved by 4 ranks: their average)" in out and "1 replicas x 2 FSDP2 shards" in out
    c = json.loads((tmp_path / "c.json").read_text())
    # trained on from the average: its loss follows the uninterrupted run's (3.828 vs 3.832 when written;
    # at step 8 the loss was 4.16, so a restart from scratch or a broken load would be far off)
    assert c["history"][-1]["step"] == 16 and abs(c["final_val_loss"] - a["final_val_loss"]) < 0.1


def test_charlm_tensor_parallel_replicas_train(tmp_path):
    out = torchrun("examples/train_charlm.py", "--tp", "2", "--steps", "8", "--k", "4", "--eval-every", "8",
                   "--d-model", "32", "--layers", "1", "--max-bytes", "200000", "--eval-batches", "2",
                   "--json-out", str(tmp_path / "a.json"), nproc=4)
    assert "4 rank(s) as 2 replicas x 2 tensor-parallel ranks" in out
    a = json.loads((tmp_path / "a.json").read_text())
    assert a["communication"]["rounds"] == 2 and a["final_val_loss"] < 5.5  # ln(256) = 5.55 at the start


def test_benchmark_smoke(tmp_path):
    # Tiny sizes so the benchmark cannot rot; no timing is asserted, only that every
    # contender ran and the report is complete.
    out = tmp_path / "bench.json"
    text = torchrun("-m", "localsgd_optim.bench", "--models", "2x32,3x16", "--bucket-cap-mb", "0.01,25",
                    "--rounds", "2", "--warmup", "1", "--step-reps", "2", "--breakdown", "--json", str(out),
                    "--baseline", "localsgd_optim")  # itself as the baseline: the before/after rows run
    report = json.loads(out.read_text())
    assert report["world_size"] == 2 and len(report["models"]) == 2
    for model in report["models"]:
        methods = [row["method"] for row in model["rounds"]]
        assert methods == [
            "flat limit (1 all-reduce, no packing)", "flat AVG", "floor: check + SUM + divide", "floor: SUM + divide",
            "per-parameter blocking", "per-parameter async (torchft)",
            "torch average_parameters", "localsgd_optim sync (cap 0.01 MB)", "localsgd_optim sync (cap 25 MB)",
            "localsgd_optim sync (cap 0.01 MB, check_finite=False)",
            "localsgd_optim sync (cap 0.01 MB, flat_params=False)", "localsgd_optim bf16 deltas (cap 0.01 MB)",
            "localsgd_optim int8 deltas+EF (cap 0.01 MB)",
            "baseline localsgd_optim sync (cap 0.01 MB)",
            "baseline localsgd_optim sync (cap 0.01 MB, check_finite=False)",
            "baseline localsgd_optim bf16 deltas (cap 0.01 MB)", "baseline localsgd_optim int8 deltas+EF (cap 0.01 MB)",
        ]
        assert model["rounds"][-2]["payload_mb"] == model["rounds"][0]["payload_mb"] / 2  # bf16 on the wire
        assert model["rounds"][-1]["payload_mb"] == model["rounds"][0]["payload_mb"] / 4  # int8
        assert model["rounds"][-6]["payload_mb"] == model["rounds"][0]["payload_mb"] / 2  # ours, bf16
        assert all(row["median_ms"] > 0 and row["ratio_to_flat"] > 0 for row in model["rounds"])
        assert model["rounds"][0]["ratio_to_flat"] == 1.0
        assert set(model["breakdown"]) >= {"stage in + out", "divide", "control collective", "whole round (sync)"}
        assert model["step"]["ratio"] > 0
    assert "non-averaging step()" in text


def test_benchmark_fake_world_counts_ops(tmp_path):
    # One process, a fake world of 4: the non-wire cost of a round, with its op count (CPU here).
    out = tmp_path / "fake.json"
    run([sys.executable, "-m", "localsgd_optim.bench", "--fake-world", "4", "--models", "4x32",
         "--bucket-cap-mb", "0.05", "--rounds", "2", "--warmup", "1", "--json", str(out)])
    (model,) = json.loads(out.read_text())["models"]
    rows = {row["method"]: row for row in model["rounds"]}
    buckets = model["buckets"]
    assert buckets == 4 and model["tensors"] == 48  # buckets of several tensors each
    assert rows["localsgd_optim sync"]["ops"] <= 12 * buckets + 30
    assert rows["torch average_parameters"]["ops"] > model["tensors"]  # torch's is O(parameters)
    assert all(row["median_ms"] > 0 for row in rows.values())


def test_charlm_ft_survivor_trains_through_a_lost_group_that_heals_and_counts_samples_exactly(tmp_path):
    """--ft, 2 replica groups under a real lighthouse. Group 1 is SIGKILLed at step 10 (mid-period,
    k=4) and relaunched; group 0 never stops: it commits every round. The new process heals from
    group 0 at a round boundary, and both end with the same parameters (param_digest). Samples:
    group r reads (step - 1) * G * B + r * B onward, so no sample is ever read twice, and the
    steps the lost group missed are the only ones nobody read."""
    import os
    import subprocess

    import pytest

    pytest.importorskip("torchft", reason="torchft is an optional extra: pip install -e '.[ft]'")
    from torchft._torchft import LighthouseServer

    lighthouse = LighthouseServer(bind="[::]:0", min_replicas=1, join_timeout_ms=10000, quorum_tick_ms=100,
                                  heartbeat_timeout_ms=2000)
    steps, k, batch = 80, 4, 4
    common = [sys.executable, "examples/train_charlm.py", "--ft", "--method", "diloco", "--steps", str(steps),
              "--k", str(k), "--eval-every", "40", "--d-model", "32", "--layers", "1", "--max-bytes", "200000",
              "--eval-batches", "2", "--batch-size", str(batch), "--step-delay", "0.12",
              "--sample-log", str(tmp_path / "samples")]

    def launch(group: int, *extra: str) -> subprocess.Popen:
        env = {**os.environ, "TORCHFT_LIGHTHOUSE": lighthouse.address(), "REPLICA_GROUP_ID": str(group)}
        return subprocess.Popen(common + ["--json-out", str(tmp_path / f"g{group}.json"), *extra], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    fail = ["--fail-at-step", "10", "--ckpt-dir", str(tmp_path)]  # (the marker file: the relaunch does not die)
    procs = [launch(0), launch(1, *fail)]
    try:
        assert procs[1].wait(timeout=120) == -9  # SIGKILLed at step 10
        procs.append(launch(1, *fail))
        outs = [p.communicate(timeout=180)[0] for p in (procs[0], procs[2])]
    finally:
        for p in procs:
            p.kill()
        lighthouse.shutdown()
    assert all(p.returncode == 0 for p in (procs[0], procs[2])), outs
    g0, g1 = (json.loads((tmp_path / f"g{g}.json").read_text()) for g in (0, 1))
    assert g0["param_digest"] == g1["param_digest"], outs  # it ends with a round: equal replicas
    assert g0["rounds_rolled_back"] == 0 and g0["rounds_committed"] == steps // k + 1  # + the final sync
    assert g0["heals"] == [] and len(g1["heals"]) == 1 and g1["heals"][0]["from"] == "charlm0"
    healed_at = g1["heals"][0]["step"]
    assert healed_at % k == 0 and 10 < healed_at <= steps
    assert g0["torchft_step"] == g1["torchft_step"] and g0["lr"] == g1["lr"]  # the schedule healed in step
    assert g1["heals"][0]["in_step"]  # (it joined a scheduled round, inside the donor's step())
    assert g1["samples_trained"] == (steps - healed_at) * batch
    read: dict[int, list[int]] = {0: [], 1: []}
    for log in (tmp_path / "samples").iterdir():  # rank<group>-<attempt>.txt: "attempt step ids..."
        group = int(log.name[len("rank")])
        for line in log.read_text().splitlines():
            _, step, *ids = map(int, line.split())
            first = ((step - 1) * 2 + group) * batch
            assert ids == list(range(first, first + batch)), (log.name, step)
            read[group] += ids
    everything = read[0] + read[1]
    assert len(everything) == len(set(everything))  # no sample read twice
    assert len(read[0]) == steps * batch and len(read[1]) == (10 + steps - healed_at) * batch


@pytest.mark.parametrize("extra", [[], ["--overlap-steps", "3"]], ids=["blocking", "asynchronous"])
def test_charlm_time_budgeted_rounds_give_the_fast_replica_more_steps(extra, tmp_path):
    """--speeds 1,3 --round-every-s: the slow rank sleeps 3x as long per step; both meet at every round,
    the fast one with at least as many steps (sleeps are lower bounds: 0.03 s against 0.09 s a step).
    --overlap-steps: the rounds are launched without waiting, and the last one lands before the end."""
    out = torchrun("examples/train_charlm.py", "--round-every-s", "0.4", "--rounds", "3", "--eval-every", "3",
                   "--speeds", "1,3", "--step-delay", "0.03", "--weight", "tokens", "--max-bytes", "200000",
                   "--d-model", "32", "--json-out", str(tmp_path / "t.json"), *extra)
    assert "round    3/3" in out, out
    result = json.loads((tmp_path / "t.json").read_text())
    fast, slow = result["steps_per_rank"]
    assert result["rounds"] == 3 and fast >= slow >= 3, result["steps_per_rank"]
