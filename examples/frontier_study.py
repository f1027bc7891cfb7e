"""The convergence study's frontier mode (``convergence_study.py --frontier``): bytes against quality.

Every method of ``FRONTIER`` at its best learning rate, 2000 steps, 4 ranks, as the tuned study:
a method already in ``tuned.json`` keeps its tuned runs; a new one (the compressors, Muon) is
run at each of ``--frontier-lrs`` (seed 0), then at the best of them with more seeds, up to
``--frontier-seeds``. The seeds go method by method in order of promise: those within 1% of
DDP's bytes first, best loss first, so a stopped study has spent its time where the goal is
decided. Every run is one ``train_charlm.py`` JSON under ``<out>/tune/`` (reused when present).

Writes ``<out>/frontier.json``::

    {"ddp_mb": ..., "ddp_loss": ..., "steps": ..., "world_size": ...,
     "methods": {name: {"label", "mb_sent_per_rank", "share_of_ddp_bytes", "final_val_loss": [per seed],
                        "vs_ddp_pct", "best_lr", "settings": {...}}}}

``<out>/frontier.md`` and ``<out>/frontier.png`` (x: MB sent per rank, log; y: final validation
loss; DDP's loss as a line). ``frontier.json`` is also a ``--tuned`` file for ``time_to_quality.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from study_common import markdown_table, pyplot
from tune_study import NotRun, Sweep, _fmt, best_outer

#: the frontier, in the order its first pass runs (tuned methods are reused, not rerun)
FRONTIER = ["ddp", "localsgd_k8", "localsgd_k8_avgstate", "diloco_k64",
            "localsgd_k8_topk3", "localsgd_k8_int2", "localsgd_k2_topk3_2bit", "localsgd_k4_topk3_2bit",
            "localsgd_k2_topk1_2bit", "localsgd_k1_topk1_2bit", "localsgd_k4_topk5_2bit",
            "localsgd_k8_topk1_2bit", "localsgd_k8_topk1", "localsgd_k8_topk10", "localsgd_k8_int4",
            "localsgd_k8_int8", "localsgd_k8_muon", "ddp_muon", "localsgd_k4_topk5_2bit_muon"]
GOAL_SHARE, GOAL_EXCESS = 0.01, 0.03  # at most 1% of DDP's bytes, within +3% of tuned DDP


def frontier(args: argparse.Namespace, methods: dict) -> None:
    sweep = Sweep(args, methods)
    tuned_path = Path(args.out) / "tuned.json"
    tuned = json.loads(tuned_path.read_text())["methods"] if tuned_path.exists() else {}
    names = [n for n in FRONTIER if n in args.names] if args.only else FRONTIER
    lrs = [float(v) for v in args.frontier_lrs.split(",")]
    report: dict = {"steps": args.steps, "world_size": args.nproc, "methods": {}}

    def entry(name: str, seeds: int) -> None:
        """Run (or reuse) ``name`` at its best lr with ``seeds`` seeds; record it; rewrite the report."""
        if name in tuned:
            t = tuned[name]
            best_lr, outer = t["best_lr"], best_outer(t)
            seed_runs = [r for r in (sweep.existing(name, best_lr, s, outer) for s in range(t["seeds"])) if r]
            per_lr = {_fmt(float(lr)): v[0] for lr, v in t["lrs"].items()}
        else:
            outer = None
            per_lr_runs = {lr: sweep.run(name, lr, 0) for lr in lrs}
            best_lr = min(per_lr_runs, key=lambda lr: per_lr_runs[lr]["final_val_loss"])
            seed_runs = [per_lr_runs[best_lr]] + [sweep.run(name, best_lr, s) for s in range(1, seeds)]
            per_lr = {_fmt(lr): r["final_val_loss"] for lr, r in per_lr_runs.items()}
        label, flags, _ = methods[name]
        comm = seed_runs[0].get("communication")
        ddp_mb = seed_runs[0]["steps"] * seed_runs[0]["params"] * 4 / 2**20
        mb = ddp_mb if name == "ddp" else comm["mb_sent"]
        report["ddp_mb"] = ddp_mb
        report["methods"][name] = {
            "label": label, "mb_sent_per_rank": mb, "share_of_ddp_bytes": mb / ddp_mb,
            "final_val_loss": [r["final_val_loss"] for r in seed_runs], "best_lr": best_lr,
            "settings": {"flags": [f.format(warmup=args.steps // 10) for f in flags], "lr": best_lr,
                         "outer": None if outer is None else {"lr": outer[0], "momentum": outer[1]},
                         "tuned_over_lrs": per_lr, "reused_from_tuned": name in tuned},
            **({"best_outer": {"lr": outer[0], "momentum": outer[1], "nesterov": outer[1] > 0}} if outer else {}),
        }
        _write(args, report)

    for name in names:  # pass 1: every method once (its lr sweep, seed 0)
        try:
            entry(name, 1)
        except NotRun as missing:
            print(f"--report: {name}: {missing} has not run yet; left out", flush=True)
    done = report["methods"]

    def promise(name: str) -> tuple:
        e = done[name]
        return (e["share_of_ddp_bytes"] > GOAL_SHARE, statistics.mean(e["final_val_loss"]))

    for name in sorted((n for n in done if n not in tuned), key=promise):  # pass 2: the seeds
        try:
            entry(name, args.frontier_seeds)
        except NotRun as missing:
            print(f"--report: {name}: {missing} has not run yet; kept {len(done[name]['final_val_loss'])} seed(s)",
                  flush=True)


def _write(args: argparse.Namespace, report: dict) -> None:
    """Rewritten after every method, so a stopped study still leaves its results so far."""
    out = Path(args.out)
    methods = report["methods"]
    if "ddp" not in methods:
        return
    ddp_losses = methods["ddp"]["final_val_loss"]
    ddp_loss = statistics.mean(ddp_losses)
    report["ddp_loss"] = ddp_loss
    rows = []
    for name, e in sorted(methods.items(), key=lambda kv: kv[1]["mb_sent_per_rank"]):
        losses = e["final_val_loss"]
        mean = statistics.mean(losses)
        # against DDP's mean over the same seeds (seed i of each): seeds differ more than some methods do
        e["vs_ddp_pct"] = 100 * (mean / statistics.mean(ddp_losses[:len(losses)]) - 1)
        meets = e["share_of_ddp_bytes"] <= GOAL_SHARE and e["vs_ddp_pct"] <= 100 * GOAL_EXCESS
        spread = f" ± {statistics.stdev(losses):.4f}" if len(losses) > 1 else ""
        rows.append([e["label"], f"{e['mb_sent_per_rank']:.1f}", f"{e['share_of_ddp_bytes']:.2%}", _fmt(e["best_lr"]),
                     f"{mean:.4f}{spread} ({len(losses)} seed{'s' * (len(losses) > 1)})", f"{e['vs_ddp_pct']:+.2f}%",
                     "yes" if meets else "-"])
    (out / "frontier.json").write_text(json.dumps(report, indent=1))
    title = (f"{report['world_size']} ranks, {report['steps']} steps; MB each rank handed to collectives "
             f"(DDP: {report['ddp_mb']:.0f} MB); vs tuned DDP's mean loss over the same seeds; goal: <= "
             f"{GOAL_SHARE:.0%} of DDP's bytes and <= +{GOAL_EXCESS:.0%}")
    table = markdown_table(["method", "MB sent per rank", "share of DDP's bytes", "lr", "final val loss",
                            "vs tuned DDP", "meets the goal"], rows)
    (out / "frontier.md").write_text(f"{title}\n\n{table}")
    print(f"\n{title}\n\n{table}", flush=True)
    if not args.no_plots:
        _plot(report, out / "frontier.png", title)


def _plot(report: dict, path: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    ddp_loss = report["ddp_loss"]
    for name, e in report["methods"].items():
        mb, losses = e["mb_sent_per_rank"], e["final_val_loss"]
        mean = statistics.mean(losses)
        ax.scatter([mb] * len(losses), losses, s=12, alpha=0.4)
        ax.plot([mb], [mean], marker="o", linestyle="none", label=f"{e['label']} ({e['vs_ddp_pct']:+.1f}%)")
    ax.axhline(ddp_loss, color="black", linestyle="-", linewidth=1, label=f"tuned DDP ({ddp_loss:.4f})")
    ax.axhline(ddp_loss * (1 + GOAL_EXCESS), color="grey", linestyle=":", label=f"DDP +{GOAL_EXCESS:.0%}")
    ax.axvline(report["ddp_mb"] * GOAL_SHARE, color="grey", linestyle="--", label=f"{GOAL_SHARE:.0%} of DDP's bytes")
    ax.set_xscale("log")
    ax.set_xlabel("MB sent per rank over the run (log)")
    ax.set_ylabel("final validation loss (nats/byte)")
    ax.set_title(title, fontsize=7)
    ax.legend(fontsize=6, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"wrote {path}")
