"""Two hosts: network namespaces joined by a rate-limited veth, torchrun --nnodes 2, c10d rendezvous.

Skipped where namespaces cannot be made (needs root and iproute2). The oracle: the same
job on one host (2 local processes) must end with bit-identical results.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import CHARLM, ROOT

SLOW_LINK = ROOT / "examples" / "slow_link.sh"


def namespaces_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs iproute2 (ip, tc)"
    probe = subprocess.run(["ip", "netns", "add", "lsgd-probe"], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", "lsgd-probe"], capture_output=True)
    return None if probe.returncode == 0 else f"cannot create network namespaces: {probe.stderr.strip()}"


def test_two_hosts_over_a_slow_link_match_one_host(tmp_path, request):
    why = namespaces_unavailable()
    if why:
        pytest.skip(why)
    job = CHARLM
    one = request.getfixturevalue("charlm_uninterrupted")  # the job on one host (run once per session)
    subprocess.run(["bash", str(SLOW_LINK), "up", "200"], check=True, capture_output=True, timeout=60)
    try:
        done = subprocess.run(["bash", str(SLOW_LINK), "run", "--", sys.executable, *job,
                               "--json-out", str(tmp_path / "two_hosts.json")],
                              cwd=ROOT, capture_output=True, text=True, timeout=240)
    finally:
        subprocess.run(["bash", str(SLOW_LINK), "down"], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    two = json.loads((tmp_path / "two_hosts.json").read_text())
    assert two["world_size"] == 2 and len(two["history"]) == len(one["history"]) == 2
    assert [h["val_loss"] for h in two["history"]] == [h["val_loss"] for h in one["history"]]
    assert [h["train_loss"] for h in two["history"]] == [h["train_loss"] for h in one["history"]]
