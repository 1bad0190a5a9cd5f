"""Runs main.py the way a user does and checks how it fails."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_main(*args, timeout=600):
    return subprocess.run([sys.executable, str(REPO / 'main.py'), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result, *needles):
    """Non-zero exit, one `error:` line on stderr naming the problem, no stack trace."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert 'Traceback' not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]
