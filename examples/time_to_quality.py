"""Time to quality over a slow link: when does each tuned method reach tuned DDP's final loss?

Two measurements, combined:

1. **Loss against steps**: the tuned convergence runs (``convergence_study.py --tune``), each
   method at its best settings, seed 0, 4 ranks, on this machine.
2. **Seconds per step over the link**: the same model, method and settings, 4 ranks as 2
   hosts x 2 over a rate-limited link (``slow_link.sh``, ``NPROC=2``), timed for ``--steps``
   steps at each rate.

A method's wall time to a loss is the step where its validation curve first reaches that
loss (linear between evaluations) times its seconds per step. Warmup steps cost what a DDP
step costs; evaluation is not counted. The target is tuned DDP's final validation loss for
seed 0, the seed of every curve here. A method that does not reach it within its 2000 steps
says so. ``--long NAME=STEPS`` adds a longer run of a tuned method (its own cosine schedule
over STEPS, 4 local ranks, run once and reused): what the same wall time buys it.
Needs root (it skips with a message otherwise).

    sudo python examples/time_to_quality.py                   # 100 and 500 Mbit/s, ~20 min
    sudo python examples/time_to_quality.py --reuse --no-plots

Writes ``<out>/time_to_quality.{json,md}``, per-run logs and JSON, and
``loss_vs_wall_<rate>mbit.png``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from convergence_study import METHODS
from slow_link_study import SLOW_LINK, can_make_namespaces
from study_common import TRAIN, finish, markdown_table, pyplot, run_logged
from tune_study import best_outer, run_tag


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", type=str, default="100,500", help="link rates in Mbit/s, each way")
    p.add_argument("--steps", type=int, default=160, help="steps timed per method and rate")
    p.add_argument("--tuned", type=str, default="benchmarks/convergence/tuned.json")
    p.add_argument("--out", type=str, default="benchmarks/convergence/time_to_quality")
    p.add_argument("--reuse", action="store_true", help="keep timings already in --out instead of rerunning")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--only", type=str, default=None,
                   help="comma-separated tuned methods to time and report (DDP, the reference, is always included); "
                        "the report then covers these only")
    p.add_argument("--long", action="append", default=[], metavar="NAME=STEPS",
                   help="also a STEPS-step run of tuned method NAME (e.g. localsgd_k8=3600)")
    args = p.parse_args(argv)
    args.rates = [int(r) for r in args.rates.split(",")]
    args.long = [(n, int(steps)) for n, steps in (item.split("=") for item in args.long)]
    return args


def tuned_flags(name: str, entry: dict, steps: int) -> list[str]:
    flags = [f.format(warmup=steps // 10) for f in METHODS[name][1]]
    flags += ["--lr", repr(entry["best_lr"])]
    outer = best_outer(entry)
    if outer:
        flags += ["--outer-lr", repr(outer[0]), "--outer-momentum", repr(outer[1])]
    return flags


def crossing(history: list[dict], target: float) -> float | None:
    """The (fractional) step where the validation curve first reaches ``target``."""
    prev_step, prev_loss = 0, float("inf")
    for point in history:
        step, loss = point["step"], point["val_loss"]
        if loss <= target:
            if prev_loss == float("inf"):
                return float(step)
            return prev_step + (step - prev_step) * (prev_loss - target) / (prev_loss - loss)
        prev_step, prev_loss = step, loss
    return None


def warmup_steps(name: str, total: int) -> int:
    return total // 10 if "{warmup}" in " ".join(METHODS[name][1]) else 0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    why = can_make_namespaces()
    if why:
        print(f"time_to_quality.py: skipping: {why}", file=sys.stderr)
        return
    tuned = json.loads(Path(args.tuned).read_text())
    timeable = sorted(n for n in tuned["methods"] if n != "none")  # "none" never averages: no model to time
    only = None if args.only is None else {"ddp", *args.only.split(",")}
    unknown = sorted((only or set()) - set(timeable))
    if unknown:
        sys.exit(f"time_to_quality.py: --only {args.only!r}: {unknown} cannot be timed; "
                 f"the tuned methods in {args.tuned} that can: {timeable}")
    methods = {n: e for n, e in tuned["methods"].items() if n in timeable and (only is None or n in only)}
    not_timed = sorted({name for name, _ in args.long} - set(methods))
    if not_timed:
        sys.exit(f"time_to_quality.py: --long {not_timed}: not among the methods timed here ({sorted(methods)}); "
                 "add them to --only")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tune_dir = Path(args.tuned).parent / "tune"
    timings: dict[int, dict[str, float]] = {}
    for rate in args.rates:
        timings[rate] = {}
        todo = [n for n in methods if not (args.reuse and (out / f"{n}_{rate}mbit.json").exists())]
        if todo:
            subprocess.run(["bash", str(SLOW_LINK), "up", str(rate)], check=True)
        try:
            for name, entry in methods.items():
                json_out = out / f"{name}_{rate}mbit.json"
                if name in todo:
                    cmd = ["bash", str(SLOW_LINK), "run", "--", sys.executable, str(TRAIN),
                           *tuned_flags(name, entry, args.steps), "--steps", str(args.steps), "--eval-every",
                           str(args.steps), "--eval-batches", "1", "--json-out", str(json_out)]
                    run_logged(cmd, out / f"{name}_{rate}mbit.log", json_out, env={"NPROC": "2"})
                run = json.loads(json_out.read_text())
                timings[rate][name] = run["world_size"] * run["batch_size"] / run["samples_per_s"]
        finally:
            subprocess.run(["bash", str(SLOW_LINK), "down"], check=False)

    curves0 = {name: (name, entry, _seed0(tune_dir, name, entry)) for name, entry in methods.items()}
    for name, steps in args.long:
        json_out = out / f"{name}_{steps}steps.json"
        if not json_out.exists():
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={tuned['world_size']}",
                   "--master-port=29533", str(TRAIN), *tuned_flags(name, methods[name], steps), "--seed", "0",
                   "--steps", str(steps), "--eval-every", "100", "--eval-batches", "24", "--json-out", str(json_out)]
            run_logged(cmd, out / f"{name}_{steps}steps.log", json_out, env={"OMP_NUM_THREADS": "1"})
        label = f"{methods[name]['label']}, {steps} steps"
        curves0[f"{name}_{steps}"] = (name, {**methods[name], "label": label}, json.loads(json_out.read_text()))
    target = curves0["ddp"][2]["final_val_loss"]
    rows, report, curves = [], [], {}
    for rate in args.rates:
        ddp_time = None
        for key, (name, entry, seed0) in curves0.items():
            steps, warm = seed0["steps"], warmup_steps(name, seed0["steps"])
            per_step, sync_step = timings[rate][name], timings[rate]["ddp"]

            def wall(step: float) -> float:
                return min(step, warm) * sync_step + max(0.0, step - warm) * per_step

            at = crossing(seed0["history"], target)
            best = min(seed0["history"], key=lambda h: h["val_loss"])
            seconds = None if at is None else wall(at)
            if key == "ddp":
                ddp_time = seconds
            curves.setdefault(rate, {})[entry["label"]] = [(wall(h["step"]), h["val_loss"]) for h in seed0["history"]]
            report.append({"rate_mbit": rate, "name": key, "label": entry["label"], "s_per_step": per_step,
                           "target_loss": target, "step_at_target": at, "seconds_to_target": seconds,
                           "seconds_for_run": wall(steps), "best_loss": best["val_loss"]})
        for r in report:
            if r["rate_mbit"] == rate:
                r["vs_ddp"] = None if r["seconds_to_target"] is None or not ddp_time else r["seconds_to_target"] / ddp_time
                rows.append([str(rate), r["label"], f"{r['s_per_step']:.3f}", f"{r['seconds_for_run']:.0f}",
                             "not reached" if r["step_at_target"] is None else f"{r['step_at_target']:.0f}",
                             "-" if r["seconds_to_target"] is None else f"{r['seconds_to_target']:.0f}",
                             "-" if r["vs_ddp"] is None else f"{r['vs_ddp']:.2f}x"])
    title = (f"4 ranks as 2 hosts x 2, tuned settings, seed 0; target = tuned DDP's final val loss, "
             f"{target:.4f}")
    table = markdown_table(["Mbit/s", "method", "s/step on the link", "s for the whole run",
                            "step reaching target", "s to target", "vs DDP"], rows)
    (out / "time_to_quality.md").write_text(f"{title}\n\n{table}")
    (out / "time_to_quality.json").write_text(json.dumps({"setup": title, "runs": report}, indent=1))
    print(f"\n{title}\n\n{table}")
    if not args.no_plots:
        for rate, by_label in curves.items():
            plt = pyplot()
            fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
            for label, pts in by_label.items():
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label)
            ax.axhline(target, color="grey", linestyle=":", label="tuned DDP's final loss")
            ax.set_xlabel(f"training wall time at {rate} Mbit/s, s (measured s/step x steps)")
            ax.set_ylabel("validation loss (nats/byte)")
            ax.set_ylim(top=min(2.0, ax.get_ylim()[1]))
            ax.set_title(title, fontsize=8)
            finish(plt, fig, ax, out / f"loss_vs_wall_{rate}mbit.png")


def _seed0(tune_dir: Path, name: str, entry: dict) -> dict:
    tag = run_tag(name, entry["best_lr"], 0, best_outer(entry))
    return json.loads((tune_dir / f"{tag}.json").read_text())


if __name__ == "__main__":
    main()
