"""Bad input: one clear line naming the problem and the fix, a non-zero exit, no stack trace.

Every check of the flags in-process (main.run on parsed flags raises the UserError whose message
main.py prints as its one `error:` line); a few through main.py itself, as a user sees them."""
import pytest

from tests.cli import run_main
from experiment import UserError

SINE = ['--datasource=sinusoid', '--norm=None', '--metatrain_iterations=10']

IMPOSSIBLE = [
    (['--datasource=cifar'], ['--datasource', 'cifar', 'omniglot']),
    (['--datasource=sinusoid', '--norm=group_norm'], ['--norm', 'layer_norm']),
    (['--datasource=omniglot', '--baseline=oracle'], ['oracle', 'sinusoid']),
    (SINE + ['--meta_batch_size=0'], ['--meta_batch_size=0', 'positive']),
    (SINE + ['--update_batch_size=-3'], ['--update_batch_size=-3']),
    (SINE + ['--update_lr=-0.1'], ['--update_lr', 'positive']),
    (SINE + ['--meta_lr=0'], ['--meta_lr', 'positive']),
    (['--datasource=miniimagenet', '--num_filters=32'], ['--max_pool=True']),
    (SINE + ['--pretrain_iterations=-1'], ['--pretrain_iterations=-1', 'zero or more']),
    (SINE + ['--keep_checkpoint_every=-5'], ['--keep_checkpoint_every=-5']),
    (SINE + ['--train_update_batch_size=0'], ['--train_update_batch_size', 'positive']),
    (['--datasource=sinusoid', '--metatrain_iterations=0'], ['nothing to train']),
    # Where the meta-batch runs
    (SINE[:-1] + ['--meta_batch_size=5', '--devices=/cpu:0,/cpu:1'], ['--meta_batch_size=5', 'evenly', '2 devices']),
    (SINE + ['--devices=/gpu:0'], ['/gpu:0 does not exist', '0 GPUs']),
    (SINE + ['--devices=2'], ['asks for 2 GPUs', '--devices=/cpu:0,/cpu:1']),
    (SINE + ['--devices=/tpu:0'], ['/tpu:0', 'not a device']),
    (SINE + ['--devices=/cpu:0,/cpu:0'], ['names a device twice']),
    (SINE + ['--devices=/cpu:0', '--cluster=127.0.0.1:1'], ['--devices and --cluster']),
    (SINE + ['--cluster=nohost'], ['nohost', 'HOST:PORT']),
    (['--job_name=ps', '--cluster=127.0.0.1:1'], ['--job_name', 'worker']),
    (['--datasource=omniglot', '--meta_batch_size=32', '--cpu_towers=3'], ['--meta_batch_size=32', '--cpu_towers=3',
                                                                           'divisor']),
    (SINE + ['--cpu_towers=-1'], ['--cpu_towers=-1', 'one per core']),
]


@pytest.mark.parametrize('args, needles', IMPOSSIBLE, ids=[' '.join(a[-1:]) for a, _ in IMPOSSIBLE])
def test_impossible_flags(tmp_path, args, needles, run_in_process):
    with pytest.raises(UserError) as raised:
        run_in_process(*args, '--logdir=' + str(tmp_path / 'logs'))
    message = str(raised.value)
    assert '\n' not in message and all(n in message for n in needles), message
    assert not (tmp_path / 'logs').exists()          # nothing made before the error


def test_main_prints_the_error_as_one_line(tmp_path, one_line_error):
    result = run_main('--datasource=cifar', '--logdir=' + str(tmp_path))
    assert result.returncode == 2
    one_line_error(result, '--datasource', 'cifar', 'omniglot')


def test_evaluating_without_a_checkpoint_is_an_error(tmp_path, run_in_process):
    # The reference silently evaluated random weights here.
    with pytest.raises(UserError, match='no checkpoint to evaluate in ' + str(tmp_path)):
        run_in_process(*SINE, '--train=False', '--logdir=' + str(tmp_path))


def test_unwritable_logdir(tmp_path, run_in_process):
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a folder')
    with pytest.raises(UserError, match='cannot write to .*; pass a writable --logdir'):
        run_in_process(*SINE, '--logdir=' + str(blocker / 'logs'))
    assert not (blocker.parent / 'logs').exists()


def test_resuming_with_the_other_moments_math_is_an_error(tmp_path, run_in_process, one_line_error):
    """A run's meta-gradient math stays the same across resumes: its folder records
    --moments_stop_gradient, and resuming with the other value names the one to pass."""
    logdir = '--logdir=' + str(tmp_path)
    first = run_main('--datasource=sinusoid', '--metatrain_iterations=3', logdir)
    assert first.returncode == 0, first.stderr[-2000:]
    records = list(tmp_path.glob('*/moments_stop_gradient.txt'))
    assert len(records) == 1 and records[0].read_text() == 'False\n'
    with pytest.raises(UserError, match='trained with --moments_stop_gradient=False; .*--resume=False'):
        run_in_process('--datasource=sinusoid', '--metatrain_iterations=6', '--moments_stop_gradient=True', logdir)
    assert sorted(p.name for p in records[0].parent.glob('model*.index')) == ['model2.index']   # untouched
    assert records[0].read_text() == 'False\n'
