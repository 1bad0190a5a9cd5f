"""Shared fixtures: where the shared golden files and data live, and Omniglot prepared once."""
import os
import signal
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get('MAML_SHARED', REPO.parent / 'shared'))
GOLDEN = SHARED / 'golden'
OMNIGLOT_ZIPS = SHARED / 'data' / 'omniglot'
sys.path.insert(0, str(REPO))


@pytest.fixture(scope='session')
def omniglot_zips():
    for name in ('images_background.zip', 'images_evaluation.zip'):
        assert (OMNIGLOT_ZIPS / name).is_file(), 'missing {} (set MAML_SHARED)'.format(OMNIGLOT_ZIPS / name)
    return OMNIGLOT_ZIPS


@pytest.fixture(scope='session')
def omniglot_root(tmp_path_factory, omniglot_zips):
    """The full Omniglot set prepared from the shared zips, once per test session."""
    sys.path.insert(0, str(REPO / 'data'))
    import prepare_omniglot
    dest = tmp_path_factory.mktemp('data') / 'omniglot_resized'
    _, was_ready = prepare_omniglot.prepare(dest, source_dir=omniglot_zips)
    assert not was_ready
    return dest


def sigint_as_in_a_terminal():
    """preexec_fn for a child that a test interrupts with SIGINT (Ctrl-C): a shell that starts the
    test run in the background (nohup, `&` without job control) leaves SIGINT ignored, and the child
    would inherit that; in a terminal it is at its default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
