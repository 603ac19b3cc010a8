"""pytest configuration: the Hypothesis profile used by every property test, what the
default run selects, and the kernels compiled up front on every core.

Examples are derandomized (a fixed seed, no example database) so a run is reproducible,
bounded in number, and have no deadline because the first call of a kernel may compile.
"""

from __future__ import annotations

import collections
import os
import re
import zlib

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "fastsce",
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("fastsce")

# The default run (pyproject's addopts: -m "not full") keeps one case in FULL_KEEP of
# every test parametrized LARGE_MATRIX times or more, chosen by a hash of the case's id
# (the same cases every run; every value of every parameter still turns up), and leaves
# out the tests marked slow (K = 32000). They are marked "full": `python -m pytest -m ""`
# (what .ci/run does) runs every case.
FULL_KEEP = 4
LARGE_MATRIX = 24


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(config, items):
    cases = collections.defaultdict(list)
    for item in items:
        if "[" in item.nodeid:
            cases[item.nodeid.split("[")[0]].append(item)
    for group in cases.values():
        if len(group) >= LARGE_MATRIX:
            for item in group:
                if zlib.crc32(item.nodeid.encode()) % FULL_KEEP:
                    item.add_marker(pytest.mark.full)
    for item in items:
        if item.get_closest_marker("slow") or _names_another_dtype(item):
            item.add_marker(pytest.mark.full)


# Each logits dtype compiles every kernel path of its own (1-2 min of CPU per dtype): the
# default run tests the float32 kernels, and leaves the cases of float64, float16 and
# bfloat16 logits to the full run. A case is one when its test's name or a parameter of
# its id names such a dtype, or its test is marked "half" or "f64".
OTHER_DTYPES = {"f64", "float64", "f16", "bf16", "float16", "bfloat16"}


def _names_another_dtype(item) -> bool:
    return (
        item.get_closest_marker("half") is not None
        or item.get_closest_marker("f64") is not None
        or not OTHER_DTYPES.isdisjoint(re.split(r"[^A-Za-z0-9]+", item.nodeid.partition("::")[2]))
    )


# A run of many tests compiles most kernel paths; Numba compiles one at a time in a
# process, so they are compiled first in worker processes on every core (fastsce.warmup;
# a few seconds when the cache is already warm), before the tests start: by the only
# process under plain pytest, by pytest-xdist's controller when the tests run in workers.
# The default run compiles the float32 paths, the full run (-m "") every dtype's.
# FASTSCE_TEST_WARMUP=0 skips it.
WARMUP_FROM_ITEMS = 300


def _warm_up(config, n_items: int) -> None:
    if config.option.collectonly or n_items < WARMUP_FROM_ITEMS or os.environ.get("FASTSCE_TEST_WARMUP", "1") == "0":
        return
    import importlib.util

    import fastsce

    dtypes = ["float32"]
    if "not full" not in (config.option.markexpr or ""):  # the other dtypes' cases run too
        dtypes += ["float64", "float16"] + (["bfloat16"] if importlib.util.find_spec("ml_dtypes") is not None else [])
    capture = config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():  # the progress lines show while it compiles
        fastsce.warmup(dtypes)


def pytest_collection_finish(session):
    if not hasattr(session.config, "workerinput"):  # (a pytest-xdist worker: its controller warms up)
        _warm_up(session.config, len(session.items))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    """pytest-xdist's controller, once the first worker has collected (the tests start
    when all have)."""
    config = node.config
    if not getattr(config, "_fastsce_warmed_up", False):
        config._fastsce_warmed_up = True
        _warm_up(config, len(ids))
