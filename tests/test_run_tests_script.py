"""run_tests.sh's worker count (TEST_WORKERS) and per-test time limit (TEST_TIMEOUT): a value that is no whole number
is refused before pytest starts (bash's `-gt` said "integer expression expected" and ran the suite in one process)."""
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("value", ["x", "0", "-1", "2.5"])
def test_a_worker_count_that_is_no_whole_number_is_refused(value):
    env = {**os.environ, "TEST_WORKERS": value}
    p = subprocess.run(["bash", str(ROOT / "run_tests.sh"), "--collect-only", "-q"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and f"TEST_WORKERS={value}: expected a whole number of worker processes" in p.stderr
    assert "collected" not in p.stdout and "integer expression" not in p.stderr


@pytest.mark.parametrize("value", ["x", "0", "90s"])
def test_a_time_limit_that_is_no_whole_number_of_seconds_is_refused(value):
    env = {**os.environ, "TEST_TIMEOUT": value, "TEST_WORKERS": "1"}
    p = subprocess.run(["bash", str(ROOT / "run_tests.sh"), "--collect-only", "-q"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and f"TEST_TIMEOUT={value}: expected a whole number of seconds" in p.stderr
    assert "collected" not in p.stdout
