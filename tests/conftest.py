import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "qjax",
    deadline=None,
    max_examples=int(os.environ.get("QJAX_HYPOTHESIS_EXAMPLES", "25")),
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("qjax")
