"""pytest configuration: the Hypothesis profile used by every property test, what the
default run selects, and the kernels compiled up front on every core.

Examples are derandomized (a fixed seed, no example database) so a run is reproducible,
bounded in number, and have no deadline because the first call of a kernel may compile.
"""

from __future__ import annotations

import collections
import os
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
        if item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.full)


# A run of many tests compiles most kernel paths; Numba compiles one at a time in a
# process, so they are compiled first in worker processes on every core (fastsce.warmup;
# a few seconds when the cache is already warm). FASTSCE_TEST_WARMUP=0 skips it.
WARMUP_FROM_ITEMS = 300


def pytest_collection_finish(session):
    if (
        session.config.option.collectonly
        or len(session.items) < WARMUP_FROM_ITEMS
        or os.environ.get("FASTSCE_TEST_WARMUP", "1") == "0"
    ):
        return
    import importlib.util

    import fastsce
    from fastsce._warmup import PATHS

    half = ["float16"] + (["bfloat16"] if importlib.util.find_spec("ml_dtypes") is not None else [])
    full_paths = list(PATHS)
    capture = session.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():  # the progress lines show while it compiles
        fastsce.warmup(["float32", "float64"])
        fastsce.warmup(half, full_paths)
