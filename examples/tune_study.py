"""The convergence study's tuning mode (``convergence_study.py --tune``): each method at its own best.

For every method: a learning-rate sweep on a x2 grid, widened (x2 at a time) while the best
value sits at an edge, so the grid brackets it; for DiLoCo, a grid over the outer lr and
momentum at the best inner lr (a coordinate search: the outer lrs at the first momentum, then the
other momenta at the best outer lr); then seeds at each method's best settings, in two passes: every
method gets 2 seeds before any gets ``--seeds``. Every run
is one ``train_charlm.py`` JSON under ``<out>/tune/``, reused when present (the sweep resumes
where it stopped). Writes ``<out>/tuned.json`` (``{"steps", "world_size", "methods": {name:
{"best_lr", "lrs": {lr: [final val loss per seed]}, "seeds", "final_val_loss", ...}}}``),
``<out>/tuned.md`` and two plots: loss against steps at the best settings, and final loss
against lr per method.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

from study_common import TRAIN, finish, markdown_table, plot_curves, pyplot, run_logged

#: the methods tuned, in the order they run (the comparisons that matter most first)
TUNED = ["ddp", "localsgd_k8", "diloco_k64", "localsgd_k8_avgstate", "localsgd_k32_warmup", "none", "localsgd_k8_extrap",
         "diloco_k8"]
#: ideas to close the gap: their lr grid starts at x0.5, x1, x2 of their baseline's best
IDEAS = {"localsgd_k8_avgstate": "localsgd_k8", "localsgd_k8_extrap": "localsgd_k8"}
MAX_WIDEN = 3  # x2 steps beyond the starting grid, each way


def _fmt(x: float) -> str:
    return f"{x:g}"


def run_tag(name: str, lr: float | str, seed: int | str, outer: tuple[float, float] | None = None) -> str:
    """A run's file name (without ``.json``) under ``<out>/tune/``."""
    return f"{name}_lr{lr if isinstance(lr, str) else _fmt(lr)}_s{seed}" + (
        f"_olr{_fmt(outer[0])}_om{_fmt(outer[1])}" if outer else "")


def best_outer(entry: dict) -> tuple[float, float] | None:
    """A tuned.json entry's outer optimizer as ``(lr, momentum)``, the form runs take; None without one."""
    outer = entry.get("best_outer")
    return None if outer is None else (outer["lr"], outer["momentum"])


class NotRun(Exception):
    """``--report``: a setting the sweep would run next has no result on disk yet."""


class Sweep:
    """Runs (or reuses) one training run per setting; every result is a JSON file."""

    def __init__(self, args: argparse.Namespace, methods: dict, steps: int | None = None) -> None:
        """``steps``: runs of another length than ``--steps`` (the horizon study), kept apart in
        ``<out>/horizon/steps<N>/``, since a run's tag does not name its length."""
        self.args, self.methods = args, methods
        self.steps = args.steps if steps is None else steps
        self.dir = Path(args.out) / ("tune" if self.steps == args.steps else f"horizon/steps{self.steps}")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.common = ["--steps", str(self.steps), "--eval-every", str(args.eval_every),
                       "--eval-batches", str(args.eval_batches), *args.extra]
        floats = lambda text: [float(v) for v in text.split(",")]  # noqa: E731
        self.grid, self.outer_lrs, self.outer_momenta = floats(args.lrs), floats(args.outer_lrs), floats(args.outer_momenta)

    def done(self, name: str, outer: tuple[float, float] | None) -> dict[float, float]:
        """Seed-0 final loss of every lr already run for this setting (an earlier, wider grid included)."""
        head, tail = run_tag(name, "*", 0, outer).split("*")
        return {float(f.name[len(head):-len(tail) - 5]): json.loads(f.read_text())["final_val_loss"]
                for f in self.dir.glob(f"{head}*{tail}.json")}

    def existing(self, name: str, lr: float, seed: int, outer: tuple[float, float] | None = None) -> dict | None:
        """The result of this setting if it has run, else None (never runs it)."""
        json_out = self.dir / f"{run_tag(name, lr, seed, outer)}.json"
        return json.loads(json_out.read_text()) if json_out.exists() else None

    def run(self, name: str, lr: float, seed: int, outer: tuple[float, float] | None = None) -> dict:
        done = self.existing(name, lr, seed, outer)
        if done is not None:
            return done
        tag = run_tag(name, lr, seed, outer)
        if self.args.report:
            raise NotRun(tag)
        _, flags, _ = self.methods[name]
        flags = [f.format(warmup=self.steps // 10) for f in flags]
        json_out = self.dir / f"{tag}.json"
        more = ["--lr", repr(lr), "--seed", str(seed)]
        if outer:
            more += ["--outer-lr", repr(outer[0]), "--outer-momentum", repr(outer[1])]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={self.args.nproc}",
               f"--master-port={self.args.port}", str(TRAIN), *flags, *more, *self.common, "--json-out", str(json_out)]
        return run_logged(cmd, self.dir / f"{tag}.log", json_out, env={"OMP_NUM_THREADS": "1"})


def _best(losses: dict[float, float]) -> float:
    return min(losses, key=losses.__getitem__)


def sweep_lr(sweep: Sweep, name: str, grid: list[float], outer: tuple[float, float] | None = None) -> dict[float, float]:
    """Seed-0 final loss per lr, the grid widened x2 while the best is at an edge."""
    losses = sweep.done(name, outer)
    losses.update({lr: sweep.run(name, lr, 0, outer)["final_val_loss"] for lr in grid if lr not in losses})
    for _ in range(MAX_WIDEN):
        lrs = sorted(losses)
        best = _best(losses)
        if best == lrs[0]:
            lr = lrs[0] / 2
        elif best == lrs[-1]:
            lr = lrs[-1] * 2
        else:
            break
        losses[lr] = sweep.run(name, lr, 0, outer)["final_val_loss"]
    return losses


def tune(args: argparse.Namespace, methods: dict) -> None:
    sweep = Sweep(args, methods)
    names = [n for n in TUNED if n in args.names] if args.only else TUNED
    # one report across both passes: the second replaces each method's entry as it gets there
    report: dict = {"steps": args.steps, "world_size": args.nproc, "methods": {}}
    curves: dict[str, tuple[float, dict]] = {}  # label -> (best lr, seed 0's run)
    if args.only:
        _keep_the_others(sweep, report, curves)
    for seeds in sorted({min(2, args.seeds), args.seeds}):
        _tune_pass(sweep, names, seeds, report, curves)


def _keep_the_others(sweep: Sweep, report: dict, curves: dict[str, tuple[float, dict]]) -> None:
    """``--only``: the methods left out keep their entries from an earlier tuned.json of the same study."""
    args = sweep.args
    path = Path(args.out) / "tuned.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    if (old.get("steps"), old.get("world_size")) != (args.steps, args.nproc):
        return
    for name, entry in old["methods"].items():
        report["methods"][name] = entry
        run = sweep.existing(name, entry["best_lr"], 0, best_outer(entry))
        if run is not None:
            curves[entry["label"]] = (entry["best_lr"], run)


def _tune_pass(sweep: Sweep, names: list[str], seeds: int, report: dict, curves: dict[str, tuple[float, dict]]) -> None:
    best_lrs: dict[str, float] = {}
    for name in names:
        try:
            best_lrs[name] = _tune_method(sweep, name, seeds, best_lrs, report, curves)
        except NotRun as missing:  # --report: this method keeps what an earlier pass found, if anything
            print(f"--report: {name}: {missing} has not run yet; "
                  f"{'kept its earlier entry' if name in report['methods'] else 'left out'}", flush=True)


def _tune_method(sweep: Sweep, name: str, seeds: int, best_lrs: dict[str, float], report: dict,
                 curves: dict[str, tuple[float, dict]]) -> float:
    """Tune one method (its lr, its outer optimizer, its seeds), write the report; its best lr."""
    outer_lrs, outer_momenta = sweep.outer_lrs, sweep.outer_momenta
    diloco = name.startswith("diloco")
    default_outer = (0.7, 0.9) if diloco else None
    base = IDEAS.get(name)
    start = [best_lrs[base] * f for f in (0.5, 1, 2)] if base in best_lrs else sweep.grid
    losses = sweep_lr(sweep, name, start, default_outer)
    best_lr, best_outer = _best(losses), default_outer
    entry: dict = {"label": sweep.methods[name][0]}
    if diloco:  # the outer optimizer at the best inner lr: lr first, then momentum
        outer_losses = {default_outer: losses[best_lr]}
        for lr in outer_lrs:
            outer_losses.setdefault((lr, outer_momenta[0]), sweep.run(name, best_lr, 0, (lr, outer_momenta[0]))["final_val_loss"])
        best_olr = _best({o: v for o, v in outer_losses.items() if o[1] == outer_momenta[0]})[0]
        for m in outer_momenta[1:]:
            outer_losses.setdefault((best_olr, m), sweep.run(name, best_lr, 0, (best_olr, m))["final_val_loss"])
        best_outer = _best(outer_losses)
        entry["outer"] = {f"lr={o[0]:g},momentum={o[1]:g}": v for o, v in sorted(outer_losses.items())}
        entry["best_outer"] = {"lr": best_outer[0], "momentum": best_outer[1], "nesterov": best_outer[1] > 0}
    per_seed = [sweep.run(name, best_lr, s, best_outer) for s in range(seeds)]
    finals = [r["final_val_loss"] for r in per_seed]
    lrs = {_fmt(lr): [loss] for lr, loss in sorted(losses.items())}
    lrs[_fmt(best_lr)] = finals if best_outer == default_outer else [losses[best_lr]]
    entry.update({"best_lr": best_lr, "lrs": lrs, "seeds": len(finals), "final_val_loss": statistics.mean(finals),
                  "final_val_loss_per_seed": finals,
                  "stdev": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                  "samples_per_s": statistics.mean(r["samples_per_s"] for r in per_seed)})
    report["methods"][name] = entry
    curves[entry["label"]] = (best_lr, per_seed[0])
    _write(sweep.args, report, curves)
    return best_lr


def _write(args: argparse.Namespace, report: dict, curves: dict[str, tuple[float, dict]]) -> None:
    """Rewritten after every method, so a stopped sweep still leaves its results so far."""
    out = Path(args.out)
    (out / "tuned.json").write_text(json.dumps(report, indent=1))
    base = report["methods"].get("ddp", {}).get("final_val_loss")
    rows = []
    for name, e in report["methods"].items():
        vs = "-" if base is None else f"{e['final_val_loss'] / base - 1:+.2%}"
        outer = e.get("best_outer")
        rows.append([e["label"], _fmt(e["best_lr"]), "-" if outer is None else f"{outer['lr']:g} / {outer['momentum']:g}",
                     f"{e['final_val_loss']:.4f} ± {e['stdev']:.4f} ({e['seeds']} seed{'s' * (e['seeds'] > 1)})", vs,
                     ", ".join(f"{lr}: {v[0]:.4f}" for lr, v in e["lrs"].items())])
    title = f"{report['world_size']} ranks, {report['steps']} steps, each method at its own best learning rate"
    table = markdown_table(["method", "best lr", "outer lr / momentum", "final val loss", "vs tuned DDP",
                            "seed-0 loss per lr"], rows)
    (out / "tuned.md").write_text(f"{title}\n\n{table}")
    print(f"\n{title}\n\n{table}", flush=True)
    if args.no_plots:
        return
    plot_curves({f"{label} (lr {lr:g})": run for label, (lr, run) in curves.items()}, out / "tuned_steps.png", title,
                "step", "optimizer step")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for name, e in report["methods"].items():
        pts = sorted((float(lr), v[0]) for lr, v in e["lrs"].items())  # seed 0 everywhere
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=e["label"])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("inner learning rate (peak of the cosine schedule)")
    ax.set_ylabel("final validation loss, seed 0 (nats/byte)")
    ax.set_title(title, fontsize=9)
    finish(plt, fig, ax, out / "tuned_lr.png")


def _tuned(args: argparse.Namespace, names: list[str], why: str) -> dict:
    """tuned.json's methods; exits saying what to run first when one of ``names`` is not tuned yet."""
    tuned_json = Path(args.out) / "tuned.json"
    tuned = json.loads(tuned_json.read_text())["methods"] if tuned_json.exists() else {}
    missing = [n for n in names if n not in tuned]
    if missing:
        sys.exit(f"{why}, and {tuned_json} has none yet for {', '.join(missing)}: "
                 f"run `convergence_study.py --tune --only {','.join(missing)}` first")
    return tuned


def gap_vs_k(args: argparse.Namespace, methods: dict, ks: list[int], state_ks: tuple[int, ...] = ()) -> None:
    """Where the gap to DDP comes from: plain Local SGD at each ``k``, seed 0, at Local SGD k=8's tuned lr.

    ``k=1`` averages after every step, so replicas never drift: its gap is what per-replica
    AdamW (each normalising its own, noisier gradient) costs or gains against DDP's one AdamW
    on the mean gradient. The rest of the curve is what longer local phases add. ``state_ks``:
    also run these k with the AdamW state averaged at rounds (such runs already on disk are
    shown for every k). Writes ``<out>/gap_vs_k.{json,md,png}``.
    """
    lr = _tuned(args, ["localsgd_k8"], "--gap-vs-k runs at Local SGD k=8's tuned lr")["localsgd_k8"]["best_lr"]
    methods = dict(methods)
    for k in ks:
        methods.setdefault(f"localsgd_k{k}", (f"Local SGD k={k}", ["--method", "localsgd", "--k", str(k)], None))
        methods.setdefault(f"localsgd_k{k}_avgstate", (f"Local SGD k={k}, AdamW state averaged",
                                                       ["--method", "localsgd", "--k", str(k), "--average-optimizer-state"], None))
    sweep = Sweep(args, methods)
    ddp = sweep.run("ddp", lr, 0)
    rows, report = [], {"lr": lr, "seed": 0, "ddp_final_val_loss": ddp["final_val_loss"], "k": {}}
    for k in sorted(ks):
        run = sweep.run(f"localsgd_k{k}", lr, 0)
        state = sweep.run(f"localsgd_k{k}_avgstate", lr, 0) if k in state_ks else sweep.existing(f"localsgd_k{k}_avgstate", lr, 0)
        gap = run["final_val_loss"] / ddp["final_val_loss"] - 1
        state_gap = None if state is None else state["final_val_loss"] / ddp["final_val_loss"] - 1
        report["k"][k] = {"final_val_loss": run["final_val_loss"], "vs_ddp": gap, "avgstate_vs_ddp": state_gap,
                          "mb_sent": (run.get("communication") or {}).get("mb_sent")}
        rows.append([str(k), f"{run['final_val_loss']:.4f}", f"{gap:+.2%}", "-" if state_gap is None else f"{state_gap:+.2%}",
                     "-" if report["k"][k]["mb_sent"] is None else f"{report['k'][k]['mb_sent']:.0f}"])
    none = sweep.existing("none", lr, 0)
    if none is not None:
        report["none_vs_ddp"] = none["final_val_loss"] / ddp["final_val_loss"] - 1
        rows.append(["never (no communication)", f"{none['final_val_loss']:.4f}", f"{report['none_vs_ddp']:+.2%}", "-", "0"])
    title = f"gap to DDP against k: {args.nproc} ranks, {args.steps} steps, lr {lr:g} (Local SGD k=8's best), seed 0"
    table = markdown_table(["k", "final val loss", "vs DDP (same lr, seed)", "with AdamW state averaged",
                            "MB sent per rank"], rows)

    def draw(ax) -> None:
        ks_run = sorted(report["k"])
        ax.plot(ks_run, [100 * report["k"][k]["vs_ddp"] for k in ks_run], marker="o", label="Local SGD")
        with_state = [k for k in ks_run if report["k"][k]["avgstate_vs_ddp"] is not None]
        if with_state:
            ax.plot(with_state, [100 * report["k"][k]["avgstate_vs_ddp"] for k in with_state], marker="s",
                    label="Local SGD, AdamW state averaged")
        if "none_vs_ddp" in report:
            ax.axhline(100 * report["none_vs_ddp"], color="grey", linestyle="--", label="no communication")
        ax.set_xscale("log", base=2)

    _write_gap(args, "gap_vs_k", report, title, table, "k (optimizer steps between averaging rounds)", draw)


def _write_gap(args: argparse.Namespace, stem: str, report: dict, title: str, table: str, xlabel: str,
               draw: Callable[[Any], None]) -> None:
    """``<out>/<stem>.{json,md}``, the table printed, and ``<stem>.png``: ``draw(ax)`` plots the
    gaps (in %) on axes that get the zero line, the labels and the title."""
    out = Path(args.out)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (out / f"{stem}.md").write_text(f"{title}\n\n{table}")
    print(f"\n{title}\n\n{table}", flush=True)
    if args.no_plots:
        return
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    draw(ax)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("final val loss above DDP's (%)")
    ax.set_title(title, fontsize=9)
    finish(plt, fig, ax, out / f"{stem}.png")

def gap_vs_steps(args: argparse.Namespace, methods: dict, horizons: list[int], names: list[str]) -> None:
    """The gap to DDP against the horizon: each method and DDP at their tuned settings, seed 0, as
    complete runs of each length (the cosine schedule spans the run).

    A gap that shrinks as the runs get longer is one that more steps (more rounds) would close.
    The settings were tuned at ``--steps``; at other lengths they are not re-tuned. Runs of
    ``--steps`` are the tuning runs; the others go to ``<out>/horizon/steps<N>/``. Writes
    ``<out>/gap_vs_steps.{json,md,png}``.
    """
    tuned = _tuned(args, ["ddp", *names], "--gap-vs-steps runs each method at its tuned settings")
    outer = {n: best_outer(tuned[n]) for n in ["ddp", *names]}
    report: dict = {"seed": 0, "settings": {n: {"lr": tuned[n]["best_lr"], "outer": outer[n]} for n in outer}, "steps": {}}
    rows = []
    for steps in horizons:
        sweep = Sweep(args, methods, steps)
        ddp = sweep.run("ddp", tuned["ddp"]["best_lr"], 0)["final_val_loss"]
        at = report["steps"][steps] = {"ddp_final_val_loss": ddp, "methods": {}}
        for name in names:
            loss = sweep.run(name, tuned[name]["best_lr"], 0, outer[name])["final_val_loss"]
            at["methods"][name] = {"final_val_loss": loss, "vs_ddp": loss / ddp - 1}
        rows.append([str(steps), f"{ddp:.4f}", *(f"{m['final_val_loss']:.4f} ({m['vs_ddp']:+.2%})" for m in at["methods"].values())])
    title = (f"gap to DDP against the run's length: {args.nproc} ranks, seed 0, each method at the settings "
             f"tuned at {args.steps} steps")
    labels = [methods[n][0] for n in names]
    table = markdown_table(["steps", "DDP", *(f"{label} (vs DDP)" for label in labels)], rows)

    def draw(ax) -> None:
        for name, label in zip(names, labels):
            ax.plot(horizons, [100 * report["steps"][s]["methods"][name]["vs_ddp"] for s in horizons], marker="o",
                    label=label)

    _write_gap(args, "gap_vs_steps", report, title, table, "optimizer steps in the run", draw)
