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
