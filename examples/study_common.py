"""What the two studies share: launching train_charlm.py, collecting its JSON, tables and plots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRAIN = HERE / "train_charlm.py"
# torch 2.13's gloo sometimes aborts a rank in C++ teardown after the script has finished
# (also with plain DDP); such a run's JSON is complete, so it is kept, never silently rerun.
TEARDOWN_ABORT = "terminate called without an active exception"


def run_logged(cmd: list[str], log: Path, json_out: Path, env: dict | None = None) -> dict:
    """Run ``cmd``, teeing its output to ``log``; return the JSON result it wrote."""
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    text = log.read_text()
    if done.returncode != 0 and not (TEARDOWN_ABORT in text and json_out.exists()):
        sys.exit(f"run failed (exit {done.returncode}); its log: {log}\n" + text[-3000:])
    result = json.loads(json_out.read_text())
    print(f"  -> final val loss {result['final_val_loss']:.4f}, {result['samples_per_s']:.0f} samples/s", flush=True)
    return result


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    cells = [header] + [[c if isinstance(c, str) else f"{c:.4g}" for c in row] for row in rows]
    lines = ["| " + " | ".join(row) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("---" for _ in header) + "|")
    return "\n".join(lines) + "\n"


def pyplot():
    try:
        import matplotlib
    except ImportError:
        sys.exit('plots need matplotlib: pip install -e ".[examples]" (or pass --no-plots)')
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(runs: dict[str, dict], path: Path, title: str, x: str, xlabel: str) -> None:
    """Validation loss against ``x`` (``step`` or ``time_s``), one line per run."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for label, run in runs.items():
        hist = run["history"]
        ax.plot([h[x] for h in hist], [h["val_loss"] for h in hist], marker=".", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(title, fontsize=9)
    lows = [h["val_loss"] for run in runs.values() for h in run["history"]]
    ax.set_ylim(min(lows) - 0.05, min(lows) + 1.0)  # the tail, where methods differ, stays readable
    finish(plt, fig, ax, path)


def finish(plt, fig, ax, path: Path) -> None:
    """Grid, legend, save to ``path``, close."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"wrote {path}")
