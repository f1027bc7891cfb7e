"""torchft's own DiLoCo (``torchft.local_sgd.DiLoCo``) on ``examples/train_charlm.py``'s model and
data: the study's second setup, one process per replica group.

    REPLICA_GROUP_ID=r TORCHFT_LIGHTHOUSE=http://localhost:PORT \\
        python benchmarks/ft/torchft_diloco.py --step-log DIR [train_charlm.py's arguments]

train_charlm.py's arguments give the model (``--layers``, ``--d-model``, ``--heads``,
``--context``), the data (``--max-bytes``, ``--batch-size``, ``--seed``), the inner AdamW
(``--lr``, its schedule) and the outer Nesterov SGD (``--outer-lr``, ``--outer-momentum``),
``--k``, ``--steps``, ``--step-delay``, ``--ft-groups`` and ``--ft-min-replicas``, with the same
defaults; ``--method`` and the rest are ignored. Group ``r`` reads samples ``(step*G + r)*B``
onward, as train_charlm's ``--ft`` does, where ``step`` counts from torchft's committed rounds
(``manager.current_step() * k`` plus the steps since the last round).

torchft is used as its documentation shows: ``Manager(use_async_quorum=False)`` over its
``ProcessGroupGloo``; the model, inner optimizer and LR schedule registered with
``register_state_dict_fn`` (DiLoCo registers the global copy and the outer optimizer itself), so
a returning group heals from a peer; DiLoCo syncs in the inner optimizer's step hook every
``k`` steps. The process ends after the round that brings torchft's step count to ``--steps``.

``--json-out`` holds fields comparable with train_charlm's: ``steps``, ``rounds_committed``,
``rounds_rolled_back``, ``heals`` (``{"step", "from"}``; torchft does not say who the donor
was, so ``from`` is null), ``torchft_step``, ``samples_trained``, ``param_digest`` (sha256 of the
final parameters' bytes, in order), ``final_val_loss`` and ``step_times`` (``time.time()`` after
every step). The step log is ``probes.StepLog``'s.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "examples")]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torchft  # noqa: E402
from torch import nn  # noqa: E402
from torchft.local_sgd import DiLoCo  # noqa: E402

import train_charlm  # noqa: E402
from probes import StepLog, counting  # noqa: E402


class Votes:
    """``manager.should_commit``, counting its verdicts (torchft's DiLoCo calls it once per round)."""

    def __init__(self, manager: torchft.Manager) -> None:
        self.vote, self.committed, self.rolled_back = manager.should_commit, 0, 0
        manager.should_commit = self

    def __call__(self, *args: Any, **kwargs: Any) -> bool:
        ok = self.vote(*args, **kwargs)
        self.committed, self.rolled_back = self.committed + ok, self.rolled_back + (not ok)
        return ok


def digest(net: nn.Module) -> str:
    h = hashlib.sha256()
    for p in net.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--step-log", required=True, metavar="DIR", help="where this process's records go")
    ours, rest = p.parse_known_args(argv)
    args = train_charlm.parse_args(rest)
    torch.set_num_threads(args.threads)
    group, groups, b, k = int(os.environ["REPLICA_GROUP_ID"]), args.ft_groups, args.batch_size, args.k
    log = StepLog(ours.step_log, group)

    store = dist.TCPStore("127.0.0.1", 0, 1, True)  # this replica group's own store (a group of one rank)
    timeout = datetime.timedelta(seconds=args.pg_timeout or 30)
    manager = torchft.Manager(pg=counting(torchft.ProcessGroupGloo)(timeout=timeout), load_state_dict=None,
                              state_dict=None, min_replica_size=args.ft_min_replicas, use_async_quorum=False,
                              replica_id=f"torchft{group}", timeout=timeout, store_addr="127.0.0.1",
                              store_port=store.port, rank=0, world_size=1)
    train, val = train_charlm.load_corpus(args)
    windows = train_charlm.GlobalWindows(train, args.context, args.seed)
    torch.manual_seed(args.seed)
    net = train_charlm.CharTransformer(256, args.d_model, args.layers, args.heads, args.context)
    inner = train_charlm.inner_optimizer(net, net, args)
    sched = torch.optim.lr_scheduler.LambdaLR(inner, train_charlm.lr_factor(args))
    outer = torch.optim.SGD(net.parameters(), lr=args.outer_lr, momentum=args.outer_momentum, nesterov=True)

    healed: list[bool] = []

    def load(state: dict[str, Any]) -> None:
        net.load_state_dict(state["model"])
        inner.load_state_dict(state["inner"])
        sched.load_state_dict(state["sched"])
        healed.append(True)

    manager.register_state_dict_fn(
        "train", load, lambda: {"model": net.state_dict(), "inner": inner.state_dict(), "sched": sched.state_dict()})
    votes = Votes(manager)
    heals, times, samples, local = [], [], 0, 0  # local: steps since the last round
    with DiLoCo(manager, [net], inner, outer, sync_every=k):
        while manager.current_step() * k < args.steps:
            step = manager.current_step() * k + local + 1
            x, y = windows.batch((step - 1) * groups * b + group * b, b)
            loss = nn.functional.cross_entropy(net(x).flatten(0, 1), y.flatten())
            loss.backward()
            inner.step()  # every k-th: DiLoCo's quorum (and heal), all-reduce, vote and outer step
            sched.step()
            inner.zero_grad()
            samples += b
            local = (local + 1) % k
            if healed:
                heals.append({"step": manager.current_step() * k, "from": None})
                healed.clear()
                print(f"replica group {group}: healed at step {heals[-1]['step']}", flush=True)
            times.append(time.time())
            log.step(manager.current_step() * k + local, votes.committed, votes.rolled_back, len(heals))
            if args.step_delay:
                time.sleep(args.step_delay)
    out = {"replica_group": group, "steps": len(times), "rounds_committed": votes.committed,
           "rounds_rolled_back": votes.rolled_back, "heals": heals, "torchft_step": manager.current_step(),
           "samples_trained": samples, "param_digest": digest(net),
           "final_val_loss": train_charlm.evaluate(net, val, args), "step_times": times}
    print(f"replica group {group}: {votes.committed} rounds committed, {votes.rolled_back} undone, {len(heals)} "
          f"heal(s), {samples} samples, params sha256 {out['param_digest'][:16]}", flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out))
    manager.shutdown(wait=False)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
