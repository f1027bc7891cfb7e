"""Convergence study: does Local SGD train as well as DDP at equal optimizer steps?

Trains the character-level LM of ``train_charlm.py`` on N ranks (default 4) once per method,
all with the same steps, batch per rank, seed, data and LR schedule, and compares final
validation loss (of the averaged model) with DDP's:

    python examples/convergence_study.py                       # all methods, 4 ranks, ~30 min on 2 cores
    python examples/convergence_study.py --steps 300 --only ddp,localsgd_k8   # a quick look

    python examples/convergence_study.py --frontier             # bytes against quality (issue 26), ~1.5 h

Writes ``<out>/convergence.{json,md}``, the per-run logs and JSON, and two plots:
validation loss against steps and against training wall time (loopback here, so wall
time mostly shows compute; see ``slow_link_study.py`` for a slow network).
Targets (issue 7): Local SGD k=8 within 1% of DDP's final loss, DiLoCo k=64 within 2%.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from study_common import TRAIN, markdown_table, plot_curves, run_logged

# name -> (label, train_charlm.py flags, target: allowed excess over DDP's final loss)
METHODS = {
    "ddp": ("DDP (gradient all-reduce every step)", ["--method", "ddp"], None),
    "none": ("no communication (each replica alone)", ["--method", "none"], None),
    "localsgd_k8": ("Local SGD k=8", ["--method", "localsgd", "--k", "8"], 0.01),
    "localsgd_k8_avgstate": ("Local SGD k=8, AdamW state averaged", ["--method", "localsgd", "--k", "8",
                                                                     "--average-optimizer-state"], None),
    "localsgd_k8_extrap": ("Local SGD k=8, outer SGD lr 1.5 (extrapolation)", ["--method", "localsgd", "--k", "8",
                                                                             "--extrapolate", "1.5"], None),
    "localsgd_k32_warmup": ("Local SGD k=32, warmup 10%", ["--method", "localsgd", "--k", "32", "--warmup-steps", "{warmup}"], None),
    "localsgd_k8_bf16": ("Local SGD k=8, bf16 deltas", ["--method", "localsgd", "--k", "8", "--compression", "bf16"], None),
    "localsgd_k8_overlap4": ("Local SGD k=8, overlapped 4 steps", ["--method", "localsgd", "--k", "8", "--overlap-steps", "4"], None),
    "diloco_k64": ("DiLoCo k=64", ["--method", "diloco", "--k", "64"], 0.02),
    "diloco_k8": ("DiLoCo k=8", ["--method", "diloco", "--k", "8"], None),
    "diloco_k64_int8": ("DiLoCo k=64, int8 deltas + EF", ["--method", "diloco", "--k", "64", "--compression", "int8"], None),
    "diloco_k64_overlap8": ("DiLoCo k=64, overlapped 8 steps", ["--method", "diloco", "--k", "64", "--overlap-steps", "8"], None),
    # the bandwidth frontier (issue 26): Local SGD with compressed deltas + error feedback, and Muon
    "localsgd_k8_int8": ("Local SGD k=8, int8 + EF", ["--method", "localsgd", "--k", "8", "--compression", "int8"], None),
    "localsgd_k8_topk10": ("Local SGD k=8, top-10% + EF", ["--method", "localsgd", "--k", "8", "--compression", "topk:0.1"], None),
    "localsgd_k8_topk3": ("Local SGD k=8, top-3% + EF", ["--method", "localsgd", "--k", "8", "--compression", "topk:0.03"], None),
    "localsgd_k8_topk1": ("Local SGD k=8, top-1% + EF", ["--method", "localsgd", "--k", "8", "--compression", "topk:0.01"], None),
    "localsgd_k8_int4": ("Local SGD k=8, 4-bit + EF", ["--method", "localsgd", "--k", "8", "--compression", "int4"], None),
    "localsgd_k8_int2": ("Local SGD k=8, 2-bit + EF", ["--method", "localsgd", "--k", "8", "--compression", "int2"], None),
    "localsgd_k8_topk1_2bit": ("Local SGD k=8, top-1% at 2 bits + EF", ["--method", "localsgd", "--k", "8", "--compression", "topk:0.01:2"], None),
    "localsgd_k8_muon": ("Local SGD k=8, Muon inner", ["--method", "localsgd", "--k", "8", "--inner", "muon"], None),
    "localsgd_k4_topk3_2bit": ("Local SGD k=4, top-3% at 2 bits + EF", ["--method", "localsgd", "--k", "4", "--compression", "topk:0.03:2"], None),
    "localsgd_k2_topk3_2bit": ("Local SGD k=2, top-3% at 2 bits + EF", ["--method", "localsgd", "--k", "2", "--compression", "topk:0.03:2"], None),
    "localsgd_k2_topk1_2bit": ("Local SGD k=2, top-1% at 2 bits + EF", ["--method", "localsgd", "--k", "2", "--compression", "topk:0.01:2"], None),
    "localsgd_k1_topk1_2bit": ("Local SGD k=1, top-1% at 2 bits + EF", ["--method", "localsgd", "--k", "1", "--compression", "topk:0.01:2"], None),
    "localsgd_k4_topk5_2bit": ("Local SGD k=4, top-5% at 2 bits + EF", ["--method", "localsgd", "--k", "4", "--compression", "topk:0.05:2"], None),
    "ddp_muon": ("DDP, Muon inner", ["--method", "ddp", "--inner", "muon"], None),
    "localsgd_k4_topk5_2bit_muon": ("Local SGD k=4, top-5% at 2 bits + EF, Muon inner",
                                    ["--method", "localsgd", "--k", "4", "--compression", "topk:0.05:2", "--inner", "muon"], None),
}

#: methods only the frontier study runs by default
FRONTIER_ONLY = {n for n in METHODS if n == "ddp_muon" or n.startswith("localsgd_k") and any(
    part in n for part in ("_int8", "_topk", "_int2", "_int4", "_muon"))}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=4, help="ranks (processes) per run")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=24, help="validation windows of 16x64 bytes each")
    p.add_argument("--only", type=str, default=None, help=f"comma-separated subset of: {','.join(METHODS)}")
    p.add_argument("--out", type=str, default="benchmarks/convergence")
    p.add_argument("--reuse", action="store_true", help="keep results already in --out instead of rerunning")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--port", type=int, default=29517)
    p.add_argument("--tune", action="store_true",
                   help="tuning mode: sweep the learning rate per method (x2 grid, widened until it brackets the "
                        "best), DiLoCo's outer lr x momentum at the best inner lr, then --seeds seeds at each "
                        "method's best; writes <out>/tune/ and <out>/tuned.{json,md,png}")
    p.add_argument("--lrs", type=str, default="3e-3,6e-3,1.2e-2,2.4e-2", help="--tune: the starting lr grid")
    p.add_argument("--seeds", type=int, default=3, help="--tune: seeds at each method's best settings")
    p.add_argument("--outer-lrs", type=str, default="0.3,0.5,0.7,1.0", help="--tune: DiLoCo outer lrs")
    p.add_argument("--outer-momenta", type=str, default="0.9,0.5", help="--tune: DiLoCo outer momenta (Nesterov; 0 is plain outer SGD); the first is searched over --outer-lrs, the rest at the best outer lr")
    p.add_argument("--report", action="store_true",
                   help="--tune: rewrite tuned.{json,md,png} from the runs already on disk, as far as the sweep "
                        "has got; run nothing")
    p.add_argument("--gap-vs-k", type=str, default=None, metavar="K,K,...",
                   help="diagnostic: plain Local SGD at these k, seed 0, at Local SGD k=8's tuned lr (needs a tuned.json); "
                        "writes <out>/gap_vs_k.{json,md,png}, reusing <out>/tune/ runs")
    p.add_argument("--gap-state-ks", type=str, default="", metavar="K,K,...",
                   help="--gap-vs-k: also run these k with the AdamW state averaged at rounds")
    p.add_argument("--gap-vs-steps", type=str, default=None, metavar="N,N,...",
                   help="diagnostic: DDP and each method (--only; default localsgd_k8,diloco_k64) at its tuned "
                        "settings, seed 0, as runs of N steps each (needs a tuned.json); writes "
                        "<out>/gap_vs_steps.{json,md,png}, reusing <out>/tune/ runs for N = --steps")
    p.add_argument("--frontier", action="store_true",
                   help="bytes against quality: every frontier method at its best lr (tuned ones reused), then "
                        "--frontier-seeds seeds; writes <out>/frontier.{json,md,png}; with --report, from the runs on disk")
    p.add_argument("--frontier-lrs", type=str, default="0.012",
                   help="--frontier: the lrs a new method is run at (default: Local SGD k=8's tuned best)")
    p.add_argument("--frontier-seeds", type=int, default=2, help="--frontier: seeds at each new method's best lr")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more train_charlm.py flags for every run")
    args = p.parse_args(argv)
    # the default (untuned) study keeps its original methods; the compressors run in --frontier
    names = args.only.split(",") if args.only else [n for n in METHODS if not args.frontier and n not in FRONTIER_ONLY
                                                    or args.frontier]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        p.error(f"--only: unknown method(s) {unknown}; choose from {list(METHODS)}")
    if "ddp" not in names:
        names.insert(0, "ddp")  # every ratio is to DDP
    args.names = names
    args.extra = [a for a in args.extra if a != "--"]
    if args.report and not (args.tune or args.frontier):
        p.error("--report rewrites the tuning or frontier report: it needs --tune or --frontier")
    if args.gap_vs_k is not None and (args.tune or args.report):
        p.error("--gap-vs-k is a mode of its own: run it without --tune/--report (it reuses the tune runs)")
    if args.gap_vs_steps is not None and (args.tune or args.report or args.gap_vs_k is not None):
        p.error("--gap-vs-steps is a mode of its own: run it without --tune/--report/--gap-vs-k")
    args.gap_vs_steps = _ks(p, "--gap-vs-steps", args.gap_vs_steps or "")
    args.horizon_names = [n for n in names if n != "ddp"] if args.only else ["localsgd_k8", "diloco_k64"]
    args.gap_vs_k = _ks(p, "--gap-vs-k", args.gap_vs_k or "")
    args.gap_state_ks = _ks(p, "--gap-state-ks", args.gap_state_ks)
    if args.gap_state_ks and not set(args.gap_state_ks) <= set(args.gap_vs_k):
        p.error(f"--gap-state-ks {args.gap_state_ks}: each k must also be in --gap-vs-k ({args.gap_vs_k})")
    return args


def _ks(p: argparse.ArgumentParser, flag: str, text: str) -> list[int]:
    """``"1,8,64"`` -> ``[1, 8, 64]``, sorted and unique; anything but positive integers is an error."""
    try:
        ks = sorted({int(k) for k in text.split(",")}) if text else []
    except ValueError:
        p.error(f"{flag} {text!r}: expected comma-separated positive integers, e.g. 1,8,64")
    if any(k < 1 for k in ks):
        p.error(f"{flag} {text!r}: every value must be at least 1")
    return ks


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.gap_vs_k:
        from tune_study import gap_vs_k

        gap_vs_k(args, METHODS, args.gap_vs_k, tuple(args.gap_state_ks))
        return
    if args.gap_vs_steps:
        from tune_study import gap_vs_steps

        gap_vs_steps(args, METHODS, args.gap_vs_steps, args.horizon_names)
        return
    if args.frontier:
        from frontier_study import frontier

        frontier(args, METHODS)
        return
    if args.tune:
        from tune_study import tune

        tune(args, METHODS)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["--steps", str(args.steps), "--eval-every", str(args.eval_every),
              "--eval-batches", str(args.eval_batches), *args.extra]
    runs = {}
    for name in args.names:
        label, flags, _ = METHODS[name]
        flags = [f.format(warmup=args.steps // 10) for f in flags]
        json_out = out / f"{name}.json"
        if args.reuse and json_out.exists():
            runs[name] = json.loads(json_out.read_text())
            continue
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}",
               f"--master-port={args.port}", str(TRAIN), *flags, *common, "--json-out", str(json_out)]
        runs[name] = run_logged(cmd, out / f"{name}.log", json_out, env={"OMP_NUM_THREADS": "1"})

    base = runs["ddp"]["final_val_loss"]
    rows, report = [], []
    for name, run in runs.items():
        label, _, target = METHODS[name]
        loss = run["final_val_loss"]
        excess = loss / base - 1
        verdict = "(baseline)" if name == "ddp" else (
            "-" if target is None else f"{'met' if excess <= target else 'MISSED'} (<= +{target:.0%})")
        rows.append([label, loss, f"{excess:+.2%}", verdict, run["samples_per_s"]])
        report.append({"name": name, "label": label, "final_val_loss": loss, "vs_ddp": excess,
                       "target": target, "samples_per_s": run["samples_per_s"]})
    any_run = next(iter(runs.values()))
    title = (f"{any_run['world_size']} ranks, {args.steps} steps, {any_run['params'] / 1e6:.2f}M-param char LM, "
             f"batch {any_run['batch_size']}x{any_run['context']} bytes per rank")
    table = markdown_table(["method", "final val loss", "vs DDP", "target", "samples/s (loopback)"], rows)
    (out / "convergence.md").write_text(f"{title}\n\n{table}")
    (out / "convergence.json").write_text(json.dumps({"setup": title, "runs": report}, indent=1))
    print(f"\n{title}\n\n{table}")
    if not args.no_plots:
        curves = {METHODS[n][0]: r for n, r in runs.items()}
        plot_curves(curves, out / "convergence_steps.png", title, "step", "optimizer step")
        plot_curves(curves, out / "convergence_time.png", title, "time_s",
                    "training wall time, s (loopback; validation excluded)")


if __name__ == "__main__":
    main()
