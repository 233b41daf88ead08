import os

from hypothesis import HealthCheck, settings

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
