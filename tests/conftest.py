from __future__ import annotations

import json

import pytest

from workers import WorkerPool

_pools: dict[int, WorkerPool] = {}


def _pool(world_size: int) -> WorkerPool:
    pool = _pools.get(world_size)
    if pool is None or pool.broken:
        pool = _pools[world_size] = WorkerPool(world_size)
    return pool


@pytest.fixture(params=[2, 3], ids=["2ranks", "3ranks"])
def ranks(request):
    """Run a function on a pool of real gloo ranks: ``ranks(fn, *args) -> [result per rank]``."""
    pool = _pool(request.param)

    def run(fn, *args):
        return pool.run(fn, *args)

    run.world_size = request.param
    return run


@pytest.fixture
def ranks2():
    return _pool(2).run


@pytest.fixture
def ranks3():
    return _pool(3).run


@pytest.fixture
def ranks4():
    """Four ranks (e.g. two 'hosts' of two): started on first use only."""
    return _pool(4).run


@pytest.fixture(scope="session")
def charlm_uninterrupted(tmp_path_factory) -> dict:
    """``helpers.CHARLM`` run uninterrupted under torchrun (2 ranks), once per session: its --json-out
    result. The resume tests (test_examples, test_failures) and the two-host test compare against it."""
    from helpers import CHARLM, torchrun

    out = tmp_path_factory.mktemp("charlm_uninterrupted") / "a.json"
    torchrun(*CHARLM, "--json-out", str(out))
    return json.loads(out.read_text())


def pytest_sessionfinish(session, exitstatus):
    for pool in _pools.values():
        pool.close()
