"""Bad input: one clear line naming the problem and the fix, a non-zero exit, no stack trace."""
import pytest

from tests.cli import assert_one_line_error, run_main

SINE = ['--datasource=sinusoid', '--norm=None', '--metatrain_iterations=10']


@pytest.mark.parametrize('args, needles', [
    (['--datasource=cifar'], ['--datasource', 'cifar', 'omniglot']),
    (['--datasource=sinusoid', '--norm=group_norm'], ['--norm', 'layer_norm']),
    (['--datasource=omniglot', '--baseline=oracle'], ['oracle', 'sinusoid']),
    (SINE + ['--meta_batch_size=0'], ['--meta_batch_size=0', 'positive']),
    (SINE + ['--update_batch_size=-3'], ['--update_batch_size=-3']),
    (SINE + ['--update_lr=-0.1'], ['--update_lr', 'positive']),
    (SINE + ['--meta_lr=0'], ['--meta_lr', 'positive']),
    (['--datasource=miniimagenet', '--num_filters=32'], ['--max_pool=True']),
])
def test_impossible_flags(tmp_path, args, needles):
    assert_one_line_error(run_main(*args, '--logdir=' + str(tmp_path)), *needles)


def test_evaluating_without_a_checkpoint_is_an_error(tmp_path):
    # The reference silently evaluated random weights here.
    result = run_main(*SINE, '--train=False', '--logdir=' + str(tmp_path))
    assert_one_line_error(result, 'no checkpoint', str(tmp_path))


def test_unwritable_logdir(tmp_path):
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a folder')
    result = run_main(*SINE, '--logdir=' + str(blocker / 'logs'))
    assert_one_line_error(result, 'cannot write', '--logdir')
    assert not (blocker.parent / 'logs').exists()


def test_resuming_with_the_other_moments_math_is_an_error(tmp_path):
    """A run's meta-gradient math stays the same across resumes: its folder records
    --moments_stop_gradient, and resuming with the other value names the one to pass."""
    logdir = '--logdir=' + str(tmp_path)
    first = run_main('--datasource=sinusoid', '--metatrain_iterations=3', logdir)
    assert first.returncode == 0, first.stderr[-2000:]
    records = list(tmp_path.glob('*/moments_stop_gradient.txt'))
    assert len(records) == 1 and records[0].read_text() == 'False\n'
    mixed = run_main('--datasource=sinusoid', '--metatrain_iterations=6', '--moments_stop_gradient=True', logdir)
    assert_one_line_error(mixed, 'trained with --moments_stop_gradient=False', '--resume=False')
    assert sorted(p.name for p in records[0].parent.glob('model*.index')) == ['model2.index']   # untouched
    again = run_main('--datasource=sinusoid', '--metatrain_iterations=6', logdir)
    assert again.returncode == 0 and 'Restoring model weights from' in again.stdout, again.stderr[-2000:]
    assert (records[0].parent / 'model5.index').is_file()
