"""pytest configuration: the Hypothesis profile used by every property test.

Examples are derandomized (a fixed seed, no example database) so a run is reproducible,
bounded in number, and have no deadline because the first call of a kernel may compile.
"""

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
