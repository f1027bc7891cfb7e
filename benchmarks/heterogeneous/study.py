"""Replicas at different speeds: k-step Local SGD where everyone waits, time-budgeted and token-weighted
rounds, and DDP, on the main job, side by side.

    python benchmarks/heterogeneous/study.py [--seeds 0 1] [--steps 240] [--step-delay 0.1]

For each speed profile (``--speeds`` of ``examples/train_charlm.py``: rank r sleeps S_r x ``--step-delay``
after each step, which dominates a step of this small model), 4 replicas (torchrun, gloo, one machine),
the same model, data and LR schedule:

- ``sync``: ``--k 8`` for ``--steps`` steps; every round waits for the slowest replica. Its final
  validation loss is the profile's target, and its training time the wall-clock budget.
- ``timed``: ``--round-every-s T --weight tokens`` for as many rounds as fit in sync's budget. ``T`` is
  k times the step time of a speed-1 replica, measured by the profile ``1,1,1,1``'s sync run, so at equal
  speeds both make the same rounds and send the same bytes.
- ``ddp``: DistributedDataParallel for ``--steps`` steps (a gradient all-reduce every step).
- ``async`` (``--methods``): ``timed`` plus ``--overlap-steps 4``: each replica launches its round when its
  own period is spent, without waiting for the others, and applies it 4 of its steps later (or at its
  next launch): Streaming DiLoCo's landing, ``p <- (p + global) / 2``.

Every run is a JSON in ``runs/`` (a run already there is not run again: the study resumes). The
summary is ``study.json`` (the issue's format, plus each run's wall time, rounds, steps per replica and
MB sent), ``study.md`` and ``loss_vs_wall_<profile>.png``. ``wall_s_to_target`` is the training time
(validation excluded) at which a run's validation loss first reaches the target, interpolated between
evaluations; ``null`` if it never does within its budget.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "examples"))

from study_common import TRAIN, finish, markdown_table, pyplot, run_logged  # noqa: E402

PROFILES = ["1,1,1,1", "1,1,1,2", "1,1.5,2,3"]
K = 8
OVERLAP = 4  # async: a round lands this many of a replica's steps after its launch
COLORS = {"sync": "C0", "timed": "C1", "ddp": "C2", "async": "C3"}
EVAL_EVERY_ROUNDS = 2


def run(method: str, profile: str, seed: int, args: argparse.Namespace, out: Path, extra: list[str]) -> dict:
    tag = f"{profile.replace(',', '-')}_{method}_s{seed}"
    json_out, log = out / "runs" / f"{tag}.json", out / "runs" / f"{tag}.log"
    if json_out.exists():
        return json.loads(json_out.read_text())
    common = ["--speeds", profile, "--seed", str(seed), "--step-delay", str(args.step_delay), "--steps",
              str(args.steps), "--k", str(K), "--eval-every", str(EVAL_EVERY_ROUNDS * K), "--d-model", "64",
              "--max-bytes", "1000000", "--threads", "1", "--json-out", str(json_out)]
    method_args = {"sync": ["--method", "localsgd"], "ddp": ["--method", "ddp"],
                   "timed": ["--method", "localsgd", "--weight", "tokens"],
                   "async": ["--method", "localsgd", "--weight", "tokens", "--overlap-steps", str(OVERLAP)]}[method]
    if method in ("timed", "async"):  # (--eval-every counts rounds here)
        common[common.index("--eval-every") + 1] = str(EVAL_EVERY_ROUNDS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", str(TRAIN), *method_args,
           *common, *extra]
    return run_logged(cmd, log, json_out)


def wall_to(history: list[dict], target: float) -> float | None:
    """The training time at which the validation loss first reaches ``target`` (linear between evaluations)."""
    before = None
    for h in history:
        if h["val_loss"] <= target:
            if before is None or before["val_loss"] == h["val_loss"]:
                return h["time_s"]
            f = (before["val_loss"] - target) / (before["val_loss"] - h["val_loss"])
            return before["time_s"] + f * (h["time_s"] - before["time_s"])
        before = h
    return None


def loss_at(history: list[dict], wall: float) -> float | None:
    """The validation loss at training time ``wall`` (linear between evaluations; a run that ended sooner:
    its final loss)."""
    before = None
    for h in history:
        if h["time_s"] >= wall:
            if before is None:
                return h["val_loss"]
            f = (wall - before["time_s"]) / (h["time_s"] - before["time_s"])
            return before["val_loss"] + f * (h["val_loss"] - before["val_loss"])
        before = h
    return history[-1]["val_loss"] if history else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=240, help="sync's and DDP's steps (timed: the same wall time)")
    p.add_argument("--step-delay", type=float, default=0.1, help="seconds added to a speed-1 step")
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--methods", nargs="+", default=["sync", "timed", "ddp"], choices=list(COLORS),
                   help="what to run besides sync (always run: it sets the target and the budget)")
    args = p.parse_args()
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    runs: dict = {}
    summary: dict = {"runs": {}, "target": {}, "setup": {
        "replicas": 4, "k": K, "steps": args.steps, "step_delay_s": args.step_delay, "seeds": args.seeds,
        "model": "examples/train_charlm.py --d-model 64 (2 layers, 4 heads, context 64, batch 16 per replica)"}}
    for seed in args.seeds:  # the round time is a speed-1 replica's k steps, from the equal-speed sync run
        base = run("sync", "1,1,1,1", seed, args, args.out, [])
        step_s = base["train_time_s"] / base["steps"]
        for profile in PROFILES:
            sync = run("sync", profile, seed, args, args.out, [])
            t = round(K * step_s, 3)
            rounds = max(1, math.ceil(sync["train_time_s"] / t))
            timing = ["--round-every-s", str(t), "--rounds", str(rounds)]
            runs.setdefault(profile, {}).setdefault(seed, {})["sync"] = sync
            for method in [m for m in args.methods if m != "sync"]:
                runs[profile][seed][method] = run(method, profile, seed, args, args.out,
                                                  timing if method in ("timed", "async") else [])
    rows = []
    for profile in PROFILES:
        by_method: dict = {m: {"final_val_loss": [], "wall_s_to_target": [], "val_loss_at_sync_wall": [],
                               "train_time_s": [], "rounds": [], "steps_per_rank": [], "mb_sent": [],
                               "mb_per_train_s": []} for m in runs[profile][args.seeds[0]]}
        targets = []
        for seed in args.seeds:
            result = runs[profile][seed]
            target = result["sync"]["final_val_loss"]
            targets.append(target)
            for method, r in result.items():
                m = by_method[method]
                m["final_val_loss"].append(r["final_val_loss"])
                m["wall_s_to_target"].append(wall_to(r["history"], target))
                m["val_loss_at_sync_wall"].append(loss_at(r["history"], result["sync"]["train_time_s"]))
                m["train_time_s"].append(r["train_time_s"])
                m["rounds"].append((r["communication"] or {}).get("rounds"))
                m["steps_per_rank"].append(r["steps_per_rank"] or [r["steps"]] * 4)
                m["mb_sent"].append((r["communication"] or {}).get("mb_sent"))
                m["mb_per_train_s"].append(m["mb_sent"][-1] / r["train_time_s"])
        summary["runs"][profile] = by_method
        summary["target"][profile] = sum(targets) / len(targets)
        sync_wall = by_method["sync"]["wall_s_to_target"]
        for method, m in by_method.items():
            ratios = [w / s if w is not None and s else None for w, s in zip(m["wall_s_to_target"], sync_wall)]
            m["wall_vs_sync"] = ratios
            loss_gap = [f / t - 1 for f, t in zip(m["final_val_loss"], targets)]
            at_budget = [x / t - 1 for x, t in zip(m["val_loss_at_sync_wall"], targets) if x is not None]
            rows.append([profile, method, _mean(m["final_val_loss"]), f"{_mean(loss_gap):+.2%}",
                         f"{_mean(at_budget):+.2%}" if len(at_budget) == len(targets) else "past the run",
                         _fmt(m["wall_s_to_target"]), _fmt(ratios, "x"), _mean(m["train_time_s"]),
                         str(m["steps_per_rank"][0]), _mean([x for x in m["rounds"] if x is not None] or [math.nan]),
                         _mean([x for x in m["mb_sent"] if x is not None] or [math.nan]), _mean(m["mb_per_train_s"])])
        if not args.no_plots:
            plt = pyplot()
            fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
            for seed in args.seeds:
                for method, r in runs[profile][seed].items():
                    h = r["history"]
                    ax.plot([x["time_s"] for x in h], [x["val_loss"] for x in h], marker=".",
                            color=COLORS[method],
                            label=f"{method} (seed {seed})", linestyle="-" if seed == args.seeds[0] else "--")
            ax.axhline(summary["target"][profile], color="grey", linewidth=0.8, label="target: sync's final loss")
            ax.set_xlabel("training time, s (validation excluded)")
            ax.set_ylabel("validation loss (nats/byte)")
            ax.set_title(f"4 replicas at speeds {profile}: loss against wall time", fontsize=9)
            finish(plt, fig, ax, args.out / f"loss_vs_wall_{profile.replace(',', '-')}.png")
    (args.out / "study.json").write_text(json.dumps(summary, indent=1))
    table = markdown_table(["speeds", "method", "final val loss", "vs target", "at sync's wall, vs target",
                            "wall s to target", "x sync's", "train s", "steps per replica (seed 0)", "rounds",
                            "MB sent/rank", "MB/s"], rows)
    slow = summary["runs"].get("1,1,1,2", {}).get("timed", {}).get("wall_vs_sync", [])
    equal = summary["runs"].get("1,1,1,1", {})
    head = (
        "# Replicas at different speeds\n\n"
        f"`python benchmarks/heterogeneous/study.py --seeds {' '.join(map(str, args.seeds))} --steps {args.steps} "
        f"--step-delay {args.step_delay}`: 4 replicas of the main job's model (d_model 64) on one 2-core machine, "
        f"gloo; rank r sleeps S_r x {args.step_delay} s after each step. sync: k={K} for {args.steps} steps (its final "
        "loss is the target, its training time the budget); timed: `--round-every-s T --weight tokens` for the "
        "rounds that fit in sync's budget, T = k x a speed-1 step (measured by the equal-speed sync run); ddp: "
        f"{args.steps} steps. Per seed where two values are given. Plots: `loss_vs_wall_<speeds>.png`.\n\n"
        f"- Goal, one replica twice as slow: timed reaches sync's final loss in at most 0.75x sync's wall time: "
        f"{' / '.join(f'{x:.2f}x' for x in slow if x is not None)}.\n"
        "- Goal, equal speeds: within +1% of sync's loss, the same bytes: timed's loss at sync's wall time is "
        f"{_mean([x / t - 1 for x, t in zip(equal['timed']['val_loss_at_sync_wall'], equal['sync']['final_val_loss'])]):+.2%}"
        f" of sync's; {_mean(equal['timed']['mb_sent']):.2f} MB sent per rank against "
        f"{_mean(equal['sync']['mb_sent']):.2f} ({_mean(equal['timed']['mb_per_train_s']):.3f} against "
        f"{_mean(equal['sync']['mb_per_train_s']):.3f} MB per second of training).\n\n"
    ) if slow and equal else "# Replicas at different speeds\n\n"
    if all("async" in summary["runs"].get(prof, {}) for prof in PROFILES):
        head += "- async against timed, sync's wall-time ratio to the target per seed: " + "; ".join(
            f"{prof}: {_fmt(summary['runs'][prof]['async']['wall_vs_sync'], 'x')} against "
            f"{_fmt(summary['runs'][prof].get('timed', {}).get('wall_vs_sync', []), 'x')}" for prof in PROFILES) + "\n\n"
    (args.out / "study.md").write_text(head + table)
    print(table)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def _fmt(xs: list[float | None], unit: str = "") -> str:
    return " / ".join("never" if x is None else f"{x:.2f}{unit}" for x in xs)


if __name__ == "__main__":
    main()
