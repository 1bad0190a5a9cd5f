"""The two suites, where the tests find their data and the reference, and the shared fixtures.

    python -m pytest -q tests            # the fast suite: every behaviour, quickly
    python -m pytest -q tests --full     # everything, with the tests marked `slow`

Everything the fast suite needs travels with the repository: the golden cases (tests/golden/), a
small real Omniglot subset (tests/data/omniglot/), stand-ins the tests generate. What does not, each
found from one documented place, and without it a test is skipped with one line saying how to give it:
- the full Omniglot set: $MAML_OMNIGLOT_ZIPS (a folder holding the two official zips), else a
  prepared data/omniglot_resized (`python data/prepare_omniglot.py` downloads and prepares it);
- the reference's code and its TensorFlow 1.15 venv: $MAML_REFERENCE_DIR and $MAML_REFERENCE_VENV
  (bench/reference.py: `--fetch`, `--build_venv`).
`--fail_on_skip` turns any skip into a failed run (CI, which gives all of them).

TensorFlow runs here with oneDNN as main.py sets it for image data (on x86: on, whatever the CPU), so
the in-process tests check the paths main.py runs; the fallback without oneDNN is tested in
subprocesses that turn it off. Child processes get the environment as it was: main.py decides there.
"""
import os
import platform
import shutil
import signal
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / 'tests' / 'golden'
OMNIGLOT_SUBSET_ZIPS = REPO / 'tests' / 'data' / 'omniglot'
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'data'))
sys.path.insert(0, str(REPO / 'bench'))


def _import_tensorflow_as_main_sets_it():
    """main.py turns oneDNN on for image data on x86 (see main.onednn_default); TensorFlow reads the
    setting once, when it loads. The variable is restored afterwards for the children."""
    before = os.environ.get('TF_ENABLE_ONEDNN_OPTS')
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    if platform.machine().lower() in ('x86_64', 'amd64'):
        os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '1')
    import tensorflow  # noqa: F401
    if before is None:
        os.environ.pop('TF_ENABLE_ONEDNN_OPTS', None)


_import_tensorflow_as_main_sets_it()

import prepare_omniglot  # noqa: E402
import reference  # noqa: E402

# The subset in tests/data/omniglot: Blackfoot and Ojibwe (background), Keble (evaluation).
OMNIGLOT_SUBSET = prepare_omniglot.Expected(alphabets=3, characters=54)
FULL_OMNIGLOT_HOW = ('needs the full Omniglot set: set {}=DIR (a folder holding images_background.zip and '
                     'images_evaluation.zip), or prepare data/omniglot_resized with `python data/prepare_omniglot.py`'
                     .format(prepare_omniglot.ZIPS_ENV))


# ---------------------------------------------------------------------------------- the two suites
def pytest_addoption(parser):
    parser.addoption('--full', action='store_true', help='also run the tests marked slow (the full suite)')
    parser.addoption('--fail_on_skip', action='store_true', help='a skipped test fails the run (CI)')


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: long runs (training, servers, 600-task evaluations, kill loops); '
                                       'run with --full')


def pytest_collection_modifyitems(config, items):
    if config.getoption('--full'):
        return
    slow = [item for item in items if item.get_closest_marker('slow')]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker('slow')]


_skipped = []


def pytest_runtest_logreport(report):
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if session.config.getoption('--fail_on_skip') and _skipped:
        print('\n--fail_on_skip: {} test(s) skipped: {}'.format(len(_skipped), ', '.join(_skipped)))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# ---------------------------------------------------------------------------------- data
@pytest.fixture(scope='session')
def omniglot_zips():
    """The folder holding the two official zips ($MAML_OMNIGLOT_ZIPS), or a skip saying how to give it."""
    given = os.environ.get(prepare_omniglot.ZIPS_ENV)
    if not given:
        pytest.skip(FULL_OMNIGLOT_HOW)
    folder = Path(given)
    missing = [name for name in prepare_omniglot.ZIP_NAMES if not (folder / name).is_file()]
    if missing:
        pytest.fail('{}={} lacks {}'.format(prepare_omniglot.ZIPS_ENV, given, ', '.join(missing)))
    return folder


@pytest.fixture(scope='session')
def omniglot_root(tmp_path_factory):
    """The full Omniglot set, prepared: from $MAML_OMNIGLOT_ZIPS into a temporary folder, else the
    repository's data/omniglot_resized if complete; else a skip saying how to give it."""
    given = os.environ.get(prepare_omniglot.ZIPS_ENV)
    if given:
        dest = tmp_path_factory.mktemp('data') / 'omniglot_resized'
        prepare_omniglot.prepare(dest, source_dir=Path(given), log=lambda line: None)
        return dest
    prepared = prepare_omniglot.DEFAULT_DEST
    if prepared.is_dir() and prepare_omniglot.survey_folder(prepared).complete:
        return prepared
    pytest.skip(FULL_OMNIGLOT_HOW)


@pytest.fixture(scope='session')
def omniglot_subset_root(tmp_path_factory):
    """tests/data/omniglot's subset (3 alphabets, 54 characters, real drawings), prepared by
    data/prepare_omniglot.py as users prepare the full set."""
    dest = tmp_path_factory.mktemp('subset') / 'omniglot_resized'
    survey, was_ready = prepare_omniglot.prepare(dest, source_dir=OMNIGLOT_SUBSET_ZIPS, log=lambda line: None,
                                                 expected=OMNIGLOT_SUBSET)
    assert survey.complete and not was_ready
    return dest


STANDIN_CHARACTERS = 1223    # main.py's split takes 1100 + 100 characters and tests on the rest
STANDIN_DRAWINGS = 4


@pytest.fixture(scope='session')
def omniglot_standin_root(omniglot_subset_root, tmp_path_factory):
    """A data root whose omniglot_resized/ has as many characters as main.py's split needs, made of
    the subset's real drawings (links, STANDIN_DRAWINGS each): each of its 54 characters stands in for
    about 23. For main.py runs that need the layout, not the variety."""
    root = tmp_path_factory.mktemp('standin')
    characters = sorted(p for p in omniglot_subset_root.glob('*/*') if p.is_dir())
    for i in range(STANDIN_CHARACTERS):
        source = characters[i % len(characters)]
        folder = root / 'omniglot_resized' / 'Alphabet{:02d}'.format(i // 30) / 'character{:02d}'.format(i % 30 + 1)
        folder.mkdir(parents=True)
        for drawing in sorted(source.glob('*.png'))[:STANDIN_DRAWINGS]:
            (folder / drawing.name).symlink_to(drawing)
    return root


# ---------------------------------------------------------------------------------- the reference
@pytest.fixture(scope='session')
def reference_code():
    """bench/reference.py with the reference's code and venv in place, or a skip saying how to give them."""
    missing = reference.problem()
    if missing:
        pytest.skip('needs the reference: ' + missing)
    return reference


# ---------------------------------------------------------------------------------- golden cases
@pytest.fixture(scope='session')
def golden_results():
    """golden_results(case, fast_paths='auto') -> the port's quantities on tests/golden/cases/CASE on one
    device (computed once per session: several tests compare with them)."""
    from tests import golden
    computed = {}

    def results(case, fast_paths='auto'):
        if (case, fast_paths) not in computed:
            computed[case, fast_paths] = golden.compute_case(str(GOLDEN / 'cases' / case), fast_paths=fast_paths)
        return computed[case, fast_paths]
    return results


# ---------------------------------------------------------------------------------- shared helpers
@pytest.fixture(scope='session')
def read_checkpoint():
    """read_checkpoint(path) -> {variable name: value} of a TensorFlow checkpoint."""
    import tensorflow as tf

    def read(path):
        reader = tf.compat.v1.train.load_checkpoint(str(path))
        return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}
    return read


def assert_one_line_error(result, *needles):
    """A command that failed as a user error should: a non-zero exit, exactly one `error:` line on
    stderr containing every needle, no stack trace. Returns the line."""
    assert result.returncode != 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert 'Traceback' not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1, result.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope='session')
def one_line_error():
    return assert_one_line_error


SINUSOID_FLAGS = ['--datasource=sinusoid', '--norm=None', '--update_batch_size=5', '--meta_batch_size=4',
                  '--log=False']
SINUSOID_EXPERIMENT = 'cls_5.mbs_4.ubs_5.numstep1.updatelr0.001nonorm'
SINUSOID_ITERATIONS = 2100      # checkpoints model1000, model2000, model2099


@pytest.fixture(scope='session')
def sinusoid_run(tmp_path_factory, read_checkpoint):
    """One uninterrupted main.py sinusoid run (SINUSOID_FLAGS, SINUSOID_ITERATIONS): (its logdir, its
    experiment folder, the final checkpoint's values). Tests copy the folder before changing it."""
    from tests.cli import run_main
    logdir = tmp_path_factory.mktemp('sinusoid_run')
    result = run_main(*SINUSOID_FLAGS, '--metatrain_iterations=%d' % SINUSOID_ITERATIONS, '--logdir=' + str(logdir))
    assert result.returncode == 0, result.stderr[-3000:]
    exp = logdir / SINUSOID_EXPERIMENT
    assert sorted(p.name for p in exp.glob('model*.index')) == [
        'model1000.index', 'model2000.index', 'model2099.index']
    return logdir, exp, read_checkpoint(exp / 'model2099')


@pytest.fixture
def copy_of_sinusoid_run(sinusoid_run, tmp_path):
    """A copy of sinusoid_run's folder: (logdir, experiment folder, the final checkpoint's values)."""
    logdir = tmp_path / 'logs'
    shutil.copytree(sinusoid_run[0], logdir)
    return logdir, logdir / SINUSOID_EXPERIMENT, sinusoid_run[2]


@pytest.fixture
def main_flags():
    """main_flags(*argv) -> main.py's flags as parsed from argv (a plain namespace; the global FLAGS
    are left unparsed), for calling main.py's functions in-process."""
    import types
    import main

    def parse(*argv):
        main.FLAGS(['main.py', *argv])
        try:
            return types.SimpleNamespace(**{name: main.FLAGS[name].value for name in main.FLAGS})
        finally:
            main.FLAGS.unparse_flags()
    return parse


@pytest.fixture
def run_in_process(main_flags):
    """run_in_process(*argv): main.run on those flags in this process, for the paths that end before a
    graph is built (bad flags, finished runs); the experiment locks it takes are released after the test."""
    import experiment
    import main
    import tensorflow as tf
    held = list(experiment._held_locks)
    yield lambda *argv: main.run(main_flags(*argv))
    for fd in [fd for fd in experiment._held_locks if fd not in held]:
        experiment._held_locks.remove(fd)
        os.close(fd)
    # main.run turns eager execution off for the process once it builds a graph: only for main.py.
    assert tf.executing_eagerly(), 'main.run went as far as building a graph in the test process'



def sigint_as_in_a_terminal():
    """preexec_fn for a child that a test interrupts with SIGINT (Ctrl-C): a shell that starts the
    test run in the background (nohup, `&` without job control) leaves SIGINT ignored, and the child
    would inherit that; in a terminal it is at its default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
