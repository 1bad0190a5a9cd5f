"""Runs main.py the way a user does."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', PYTHONUNBUFFERED='1')


def main_command(*args):
    return [sys.executable, str(REPO / 'main.py'), *args]


def run_main(*args, timeout=600):
    return subprocess.run(main_command(*args), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
