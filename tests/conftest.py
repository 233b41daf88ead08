import os

from hypothesis import HealthCheck, settings

# XLA's CPU backend at -O0 compiles faster, and the suite is mostly the compilation of small
# programs (tests/test_mx.py: 46 s -> 35 s of CPU time, -24%). Results stay what XLA promises; no test
# compares bits across optimization levels. QJAX_TEST_XLA_OPT=1 keeps XLA's default. Set before any
# computation: XLA reads its flags when the backend starts; subprocesses inherit them.
FAST_COMPILE = "--xla_backend_optimization_level=0"
if os.environ.get("QJAX_TEST_XLA_OPT") != "1" and FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

settings.register_profile(
    "qjax",
    deadline=None,
    max_examples=int(os.environ.get("QJAX_HYPOTHESIS_EXAMPLES", "15")),  # more: QJAX_HYPOTHESIS_EXAMPLES=100
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("qjax")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Print the bad-input table's counts per class whenever its tests ran (issue: keep the figure)."""
    ran = {r.nodeid for reports in terminalreporter.stats.values() for r in reports
           if hasattr(r, "nodeid") and "tests/bad_input/" in r.nodeid}
    if not ran:
        return
    from tests.bad_input.report import format_counts, promised_counts

    terminalreporter.write_line(format_counts(promised_counts(), "bad-input suite, cases per class"))


def pytest_collection_modifyitems(config, items):
    """The slow tests first (stable otherwise): under ``-n 2`` the long ones start while the short ones are
    still queued, so neither worker is left running one long test alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
