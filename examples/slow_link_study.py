"""Two hosts over a slow link: training throughput and loss against wall time.

Makes two network namespaces joined by a veth pair rate-limited with ``tc tbf``
(``slow_link.sh``), runs ``train_charlm.py`` on both with ``torchrun --nnodes 2`` (c10d
rendezvous over that link), and measures samples/s at each bandwidth for: compute only
(no communication at all: the physical limit), DDP, Local SGD k=8, and Local SGD k=8 with
overlapped rounds. Needs root (it skips with a message otherwise).

    sudo python examples/slow_link_study.py                       # 100, 500, 2000 Mbit/s, ~20 min
    sudo python examples/slow_link_study.py --rates 500 --steps 100

The model is the issue's: a 4-layer, width-256 transformer (3.3M parameters) with AdamW.
Writes ``<out>/slow_link.{json,md}``, per-run logs and JSON, ``throughput_vs_bandwidth.png``
and ``loss_vs_time_<rate>mbit.png``. Targets (issue 7, at 500 Mbit/s): Local SGD k=8 >= 0.93x
of compute-only, overlapped >= 0.97x.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from study_common import HERE, TRAIN, finish, markdown_table, plot_curves, pyplot, run_logged

SLOW_LINK = HERE / "slow_link.sh"
MODEL = ["--d-model", "256", "--layers", "4", "--heads", "4"]
# name -> (label, train_charlm.py flags, target ratio to compute-only at 500 Mbit/s)
METHODS = {
    "none": ("compute only (no communication)", ["--method", "none"], None),
    "ddp": ("DDP", ["--method", "ddp"], None),
    "localsgd_k8": ("Local SGD k=8", ["--method", "localsgd", "--k", "8"], 0.93),
    "localsgd_k8_overlap4": ("Local SGD k=8, overlapped 4 steps",
                             ["--method", "localsgd", "--k", "8", "--overlap-steps", "4"], 0.97),
}
#: --streaming: Local SGD k=8 in P fragments (Streaming DiLoCo's schedule), blocking, bf16 deltas, or
#: overlapped for all but one step of the gap between two fragments' syncs (k // P - 1 steps).
STREAMING = {
    f"stream_p{p}{tag}": (f"k=8, P={p}{label}", ["--method", "localsgd", "--k", "8", "--fragments", str(p), *flags],
                          0.95 if tag == "_overlap" else None)
    for p in (1, 2, 4)
    for tag, label, flags in (("", "", []), ("_bf16", ", bf16", ["--compression", "bf16"]),
                              ("_overlap", f", overlapped {8 // p - 1}", ["--overlap-steps", str(8 // p - 1)]))
}


def can_make_namespaces() -> str | None:
    """Why this machine cannot run the study, or None if it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs the '{tool}' command (iproute2)"
    probe = subprocess.run(["ip", "netns", "add", "lsgd-probe"], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", "lsgd-probe"], capture_output=True)
    if probe.returncode != 0:
        return f"cannot create network namespaces: {probe.stderr.strip()}"
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", type=str, default="100,500,2000", help="link rates in Mbit/s, each way")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--only", type=str, default=None, help=f"comma-separated subset of: {','.join(METHODS)}")
    p.add_argument("--streaming", action="store_true",
                   help=f"Streaming DiLoCo instead: compute only and k=8 in P=1, 2, 4 fragments "
                        f"({', '.join(STREAMING)}); writes <out>/streaming.{{json,md}}")
    p.add_argument("--out", type=str, default=None,
                   help="default: benchmarks/slow_link, or benchmarks/slow_link/streaming with --streaming")
    p.add_argument("--reuse", action="store_true", help="keep results already in --out instead of rerunning")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more train_charlm.py flags for every run")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = "benchmarks/slow_link/streaming" if args.streaming else "benchmarks/slow_link"
    args.rates = [int(r) for r in args.rates.split(",")]
    if args.streaming:
        METHODS.update(STREAMING)
    args.names = args.only.split(",") if args.only else (["none", *STREAMING] if args.streaming else
                                                         [n for n in METHODS if n not in STREAMING])
    unknown = [n for n in args.names if n not in METHODS]
    if unknown:
        p.error(f"--only: unknown method(s) {unknown}; choose from {list(METHODS)}")
    if "none" not in args.names:
        args.names.insert(0, "none")  # every ratio is to compute-only
    args.extra = [a for a in args.extra if a != "--"]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    why = can_make_namespaces()
    if why:
        print(f"slow_link_study.py: skipping: {why}", file=sys.stderr)
        return
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = [*MODEL, "--steps", str(args.steps), "--eval-every", str(args.eval_every),
              "--eval-batches", "8", *args.extra]
    results: dict[int, dict[str, dict]] = {}
    for rate in args.rates:
        results[rate] = {}
        pending = [n for n in args.names if not (args.reuse and (out / f"{n}_{rate}mbit.json").exists())]
        if pending:
            subprocess.run(["bash", str(SLOW_LINK), "up", str(rate)], check=True)
        try:
            for name in args.names:
                json_out = out / f"{name}_{rate}mbit.json"
                if name not in pending:
                    results[rate][name] = json.loads(json_out.read_text())
                    continue
                cmd = ["bash", str(SLOW_LINK), "run", "--", sys.executable, str(TRAIN), *METHODS[name][1],
                       *common, "--json-out", str(json_out)]
                results[rate][name] = run_logged(cmd, out / f"{name}_{rate}mbit.log", json_out)
        finally:
            subprocess.run(["bash", str(SLOW_LINK), "down"], check=False)

    rows, report = [], []
    target_rate = 100 if args.streaming else 500
    # Compute-only does not depend on the link: with --streaming the limit is the fastest
    # compute-only run of the sweep (rate-independent, and the conservative one on a noisy machine).
    fastest = max(runs["none"]["samples_per_s"] for runs in results.values())
    for rate, runs in results.items():
        limit = fastest if args.streaming else runs["none"]["samples_per_s"]
        for name, run in runs.items():
            label, _, target = METHODS[name]
            ratio = run["samples_per_s"] / limit
            verdict = "-" if target is None or rate != target_rate else \
                f"{'met' if ratio >= target else 'MISSED'} (>= {target})"
            comm = run.get("communication") or {}
            per_round = comm.get("mb_per_round")
            rows.append([f"{rate}", label, run["samples_per_s"], f"{ratio:.3f}", verdict,
                         "-" if per_round is None else f"{per_round:.2f}", run["final_val_loss"]])
            report.append({"rate_mbit": rate, "name": name, "label": label, "samples_per_s": run["samples_per_s"],
                           "ratio_to_compute_only": ratio, "mb_per_round": per_round,
                           "final_val_loss": run["final_val_loss"]})
    any_run = next(iter(results[args.rates[0]].values()))
    title = (f"2 hosts x 1 rank, {any_run['params'] / 1e6:.1f}M-param char LM, AdamW, "
             f"batch {any_run['batch_size']}x{any_run['context']} bytes per rank, {args.steps} steps")
    table = markdown_table(["Mbit/s", "method", "samples/s", "x compute-only", f"target at {target_rate}",
                            "MB per round (mean)", "final val loss"], rows)
    stem = "streaming" if args.streaming else "slow_link"
    (out / f"{stem}.md").write_text(f"{title}\n\n{table}")
    (out / f"{stem}.json").write_text(json.dumps({"setup": title, "runs": report}, indent=1))
    print(f"\n{title}\n\n{table}")
    if args.no_plots:
        return
    for rate, runs in results.items():
        plot_curves({METHODS[n][0]: r for n, r in runs.items()}, out / f"{stem}_loss_vs_time_{rate}mbit.png"
                    if args.streaming else out / f"loss_vs_time_{rate}mbit.png",
                    f"{rate} Mbit/s link: {title}", "time_s", "training wall time, s (validation excluded)")
    plot_throughput(results, out / f"{'streaming_' if args.streaming else ''}throughput_vs_bandwidth.png", title)


def plot_throughput(results: dict[int, dict[str, dict]], path: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    rates = sorted(results)
    for name, (label, _, _) in METHODS.items():
        if all(name in results[r] for r in rates):
            ax.plot(rates, [results[r][name]["samples_per_s"] for r in rates], marker="o", label=label,
                    linestyle="--" if name == "none" else "-")
    ax.set_xscale("log")
    ax.set_xticks(rates, [str(r) for r in rates])
    ax.set_xlabel("link bandwidth, Mbit/s each way (log scale)")
    ax.set_ylabel("training throughput, samples/s")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    finish(plt, fig, ax, path)


if __name__ == "__main__":
    main()
