"""The fuzz suite's hypothesis profiles, one place for every tests/fuzz file.

"ci" (the default): a fixed, derandomised set of 25 examples a test, minutes for the suite.
"dev": 2,000 random examples a test, for a developer's machine:
`HYPOTHESIS_PROFILE=dev pytest tests/fuzz`.
"""

import os

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the fuzz files skip themselves (pytest.importorskip)
    pass
else:
    _COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
    settings.register_profile("ci", max_examples=25, derandomize=True, **_COMMON)
    settings.register_profile("dev", max_examples=2000, **_COMMON)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
