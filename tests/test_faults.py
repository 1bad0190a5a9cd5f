"""Faults during long runs: damaged checkpoints, kills (during a save too), two runs on one folder,
a failing save. Real main.py processes; each resumes and is compared with an uninterrupted run."""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tests.cli import REPO, assert_one_line_error, run_main
from utils import checkpoint_problem

tf1 = tf.compat.v1
FLAGS = ['--datasource=sinusoid', '--norm=None', '--update_batch_size=5', '--meta_batch_size=4', '--log=False']
EXP = 'cls_5.mbs_4.ubs_5.numstep1.updatelr0.001nonorm'
TOTAL = 2100    # checkpoints model1000, model2000, model2099

# main.py with a fault injected into utils.save_checkpoint at model{KILL_AT}: the process dies
# (os._exit, like kill -9: no handler, no cleanup) at KILL_POINT, or the save fails like a full disk.
FAULTY_MAIN = '''
import os, runpy, sys
sys.path.insert(0, os.getcwd())
import tensorflow as tf
import utils
target, point = '.partial-model' + os.environ['KILL_AT'], os.environ['KILL_POINT']
final = 'model' + os.environ['KILL_AT'] + '.index'
real_files, real_replace, real_save = utils.checkpoint_files, os.replace, tf.compat.v1.train.Saver.save
def checkpoint_files(path):
    if point == 'after_write' and path.endswith(target):
        os._exit(9)
    return real_files(path)
def replace(src, dst):
    if point == 'between_renames' and dst.endswith(final):
        os._exit(9)
    real_replace(src, dst)
    if point == 'before_state' and dst.endswith(final):
        os._exit(9)
def save(self, sess, path, *args, **kwargs):
    if point == 'disk_full' and path.endswith(target):
        raise OSError(28, 'No space left on device')
    return real_save(self, sess, path, *args, **kwargs)
utils.checkpoint_files, os.replace, tf.compat.v1.train.Saver.save = checkpoint_files, replace, save
sys.argv = ['main.py'] + sys.argv[1:]
runpy.run_path('main.py', run_name='__main__')
'''


def run_faulty(point, at, *args):
    env = dict(os.environ, KILL_POINT=point, KILL_AT=str(at), TF_CPP_MIN_LOG_LEVEL='3')
    return subprocess.run([sys.executable, '-c', FAULTY_MAIN, *args], cwd=str(REPO), env=env,
                          capture_output=True, text=True, timeout=600)


def values(path):
    reader = tf1.train.load_checkpoint(str(path))
    return {name: reader.get_tensor(name) for name, _ in tf1.train.list_variables(str(path))}


def assert_same_weights(path, reference):
    got = values(path)
    assert set(got) == set(reference) and any('Adam' in name for name in got)
    for name in reference:
        np.testing.assert_allclose(got[name], reference[name], atol=1e-6, err_msg=name)


def restored_from(result):
    lines = [line for line in result.stdout.splitlines() if line.startswith('Restoring model weights from ')]
    return os.path.basename(lines[-1].split()[-1]) if lines else None


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
    """An uninterrupted run of TOTAL iterations: its folder and the final weights."""
    logdir = tmp_path_factory.mktemp('finished')
    result = run_main(*FLAGS, '--metatrain_iterations=%d' % TOTAL, '--logdir=' + str(logdir))
    assert result.returncode == 0, result.stderr[-3000:]
    exp = logdir / EXP
    assert sorted(p.name for p in exp.glob('model*.index')) == [
        'model1000.index', 'model2000.index', 'model2099.index']
    return logdir, values(exp / 'model2099')


@pytest.fixture
def copy_of_finished(finished, tmp_path):
    logdir = tmp_path / 'logs'
    shutil.copytree(finished[0], logdir)
    return logdir, logdir / EXP, finished[1]


def resume(logdir, total=TOTAL):
    return run_main(*FLAGS, '--metatrain_iterations=%d' % total, '--logdir=' + str(logdir))


# ------------------------------------------------------------------------------ damaged checkpoint
@pytest.mark.parametrize('damage', ['truncated data', 'bad index'])
def test_damaged_newest_checkpoint_is_moved_aside_and_training_resumes_from_the_newest_intact(
        copy_of_finished, damage):
    logdir, exp, final_weights = copy_of_finished
    if damage == 'truncated data':
        with open(exp / 'model2099.data-00000-of-00001', 'r+b') as f:
            f.truncate(100)
    else:
        (exp / 'model2099.index').write_bytes(b'\0garbage' * 8)
    assert checkpoint_problem(str(exp / 'model2099'))
    result = resume(logdir)
    assert result.returncode == 0, result.stderr[-3000:]
    damaged_line = [line for line in result.stdout.splitlines() if line.startswith('Checkpoint ')]
    assert len(damaged_line) == 1 and str(exp / 'model2099') in damaged_line[0], result.stdout
    assert 'is damaged' in damaged_line[0] and 'moved its files to ' + str(exp / 'damaged') in damaged_line[0]
    aside = damaged_line[0].split('moved its files to ')[1].rstrip('.')
    assert sorted(os.listdir(aside)) == ['model2099.data-00000-of-00001', 'model2099.index']
    assert 'Resuming from {}.'.format(exp / 'model2000') in result.stdout
    assert restored_from(result) == 'model2000'
    assert_same_weights(exp / 'model2099', final_weights)       # the lost 99 iterations redone exactly


def test_missing_index_and_a_checkpoint_file_naming_it(copy_of_finished):
    logdir, exp, final_weights = copy_of_finished
    (exp / 'model2099.index').unlink()
    result = resume(logdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'The checkpoint file names {}, which does not exist'.format(exp / 'model2099') in result.stdout
    assert restored_from(result) == 'model2000'
    assert_same_weights(exp / 'model2099', final_weights)


def test_stale_checkpoint_file_naming_an_absent_checkpoint(copy_of_finished):
    logdir, exp, _ = copy_of_finished
    (exp / 'checkpoint').write_text('model_checkpoint_path: "model9999"\n'
                                    'all_model_checkpoint_paths: "model9999"\n')
    result = resume(logdir, total=2300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'names {}, which does not exist; using the newest intact checkpoint, {}'.format(
        exp / 'model9999', exp / 'model2099') in result.stdout
    assert restored_from(result) == 'model2099'
    assert (exp / 'model2299.index').is_file()
    assert 'model_checkpoint_path: "model2299"' in (exp / 'checkpoint').read_text()


def test_evaluating_a_damaged_test_iter_names_it_and_the_intact_ones(copy_of_finished):
    logdir, exp, _ = copy_of_finished
    with open(exp / 'model2000.data-00000-of-00001', 'r+b') as f:
        f.seek(200)
        f.write(b'\xff' * 64)                                     # corrupted in place: a checksum error
    result = run_main(*FLAGS, '--train=False', '--test_iter=2000', '--logdir=' + str(logdir))
    line = assert_one_line_error(result, '--test_iter=2000', str(exp / 'model2000'), 'damaged', '1000', '2099')
    assert 'intact: [1000, 2099]' in line
    assert (exp / 'model2000.index').is_file()                    # evaluation moves nothing


# ------------------------------------------------------------------------------ killed at any moment
@pytest.mark.parametrize('point', ['after_write', 'between_renames', 'before_state'])
def test_killed_during_a_save_resumes_from_the_newest_complete_checkpoint(finished, tmp_path, point):
    logdir = tmp_path / 'logs'
    killed = run_faulty(point, 2000, *FLAGS, '--metatrain_iterations=%d' % TOTAL, '--logdir=' + str(logdir))
    assert killed.returncode == 9, killed.stdout[-2000:] + killed.stderr[-2000:]
    exp = logdir / EXP
    complete = sorted(p.name for p in exp.glob('model*.index'))
    assert complete == (['model1000.index', 'model2000.index'] if point == 'before_state' else ['model1000.index'])
    result = resume(logdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert restored_from(result) == ('model2000' if point == 'before_state' else 'model1000')
    left = {'after_write': 2, 'between_renames': 1}.get(point)     # .partial-model2000 index and data
    if left:
        assert 'Removed {} temporary file(s) of a save that was interrupted.'.format(left) in result.stdout
    assert not [f for f in os.listdir(exp) if f.startswith('.partial')]
    assert_same_weights(exp / 'model2099', finished[1])


def test_kill_9_near_a_save_loses_at_most_one_save_interval(finished, tmp_path):
    logdir = tmp_path / 'logs'
    process = subprocess.Popen([sys.executable, '-u', str(REPO / 'main.py'), *FLAGS,
                                '--metatrain_iterations=%d' % TOTAL, '--logdir=' + str(logdir)],
                               cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in process.stdout:                    # printed just before model2000 is saved
        if line.startswith('Iteration 2000:'):
            process.send_signal(signal.SIGKILL)
            break
    process.wait()
    assert process.returncode == -signal.SIGKILL
    result = resume(logdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert restored_from(result) in ('model1000', 'model2000')
    assert_same_weights(logdir / EXP / 'model2099', finished[1])


# ------------------------------------------------------------------------------ two runs, one folder
def test_a_second_run_on_a_live_folder_is_refused_and_a_killed_runs_lock_does_not_block(tmp_path):
    logdir = tmp_path / 'logs'
    first = subprocess.Popen([sys.executable, '-u', str(REPO / 'main.py'), *FLAGS,
                              '--metatrain_iterations=1000000', '--logdir=' + str(logdir)],
                             cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in first.stdout:
            if line.startswith('Done initializing'):
                break
        started = time.time()
        second = run_main(*FLAGS, '--metatrain_iterations=1000000', '--logdir=' + str(logdir))
        assert_one_line_error(second, 'another training run', 'pid {}'.format(first.pid), str(logdir / EXP))
        assert time.time() - started < 60 and 'Done initializing' not in second.stdout
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    earlier = sorted(p.name for p in (logdir / EXP).glob('model*.index'))
    third = run_main(*FLAGS, '--metatrain_iterations=50', '--resume=False', '--logdir=' + str(logdir))
    assert third.returncode == 0, third.stderr[-3000:]
    assert sorted(p.name for p in (logdir / EXP).glob('model*.index')) == ['model49.index']
    if earlier:   # what the killed run saved is set aside, not deleted
        assert '--resume=False: moved the {} earlier checkpoint(s) to'.format(len(earlier)) in third.stdout
        assert sorted(p.name for p in (logdir / EXP / 'previous').glob('*/model*.index')) == earlier


# ------------------------------------------------------------------------------ a failing save
def test_a_failing_save_stops_with_one_line_and_keeps_the_earlier_checkpoints(tmp_path):
    logdir = tmp_path / 'logs'
    result = run_faulty('disk_full', 2000, *FLAGS, '--metatrain_iterations=%d' % TOTAL, '--logdir=' + str(logdir))
    exp = logdir / EXP
    assert_one_line_error(result, 'could not save checkpoint model2000 at iteration 2000', str(exp),
                          'No space left on device', 'intact')
    assert sorted(os.listdir(exp)) == ['.lock', 'checkpoint', 'model1000.data-00000-of-00001', 'model1000.index',
                                     'moments_stop_gradient.txt']
    assert checkpoint_problem(str(exp / 'model1000')) is None
    assert 'model_checkpoint_path: "model1000"' in (exp / 'checkpoint').read_text()
    resumed = resume(logdir)
    assert resumed.returncode == 0 and restored_from(resumed) == 'model1000', resumed.stderr[-3000:]


def test_an_unwritable_experiment_folder_mid_run_is_a_failed_save(tmp_path):
    """The folder replaced by a file while training: the save at model1000 fails with one line."""
    logdir = tmp_path / 'logs'
    process = subprocess.Popen([sys.executable, '-u', str(REPO / 'main.py'), *FLAGS,
                                '--metatrain_iterations=%d' % TOTAL, '--logdir=' + str(logdir)],
                               cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.startswith('Done initializing'):
            break
    exp = logdir / EXP
    shutil.rmtree(exp)
    exp.write_text('not a folder any more')
    stdout, stderr = process.communicate(timeout=600)
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    assert_one_line_error(result, 'could not save checkpoint model1000 at iteration 1000', str(exp))


def save_counter_checkpoints(folder, iterations, keep_every=0):
    """save_checkpoint of a counter v (v = how many saves so far) at each of `iterations`; returns
    the names of the checkpoints left in folder, the newest first."""
    from utils import list_checkpoints, save_checkpoint
    with tf.Graph().as_default():
        variable = tf1.get_variable('v', [3], initializer=tf1.zeros_initializer())
        step = tf1.assign_add(variable, tf.ones([3]))
        saver = tf1.train.Saver(max_to_keep=None)
        with tf1.Session() as sess:
            sess.run(tf1.global_variables_initializer())
            for itr in iterations:
                sess.run(step)
                saved = save_checkpoint(saver, sess, str(folder), itr, keep_every=keep_every)
                assert saved == str(folder / ('model%d' % itr))
    return [os.path.basename(p) for p in list_checkpoints(str(folder))]


def test_save_checkpoint_keeps_the_newest_ten_and_names_them_in_the_checkpoint_file(tmp_path):
    kept = save_counter_checkpoints(tmp_path, range(0, 13000, 1000))
    assert kept == ['model%d' % i for i in range(12000, 2000, -1000)]
    assert sorted(os.listdir(tmp_path)) == sorted(['checkpoint'] + [n + suffix for n in kept for suffix in (
        '.index', '.data-00000-of-00001')])
    state = tf1.train.get_checkpoint_state(str(tmp_path))      # relative names, read back as paths
    assert (tmp_path / 'checkpoint').read_text().startswith('model_checkpoint_path: "model12000"\n')
    assert list(state.all_model_checkpoint_paths) == [str(tmp_path / n) for n in reversed(kept)]
    assert tf1.train.latest_checkpoint(str(tmp_path)) == str(tmp_path / 'model12000')
    np.testing.assert_array_equal(values(tmp_path / 'model12000')['v'], [13, 13, 13])


def test_save_checkpoint_keeps_every_multiple_of_keep_every_besides_the_newest_ten(tmp_path):
    kept = save_counter_checkpoints(tmp_path, list(range(1000, 21000, 1000)) + [20999], keep_every=5000)
    assert kept == ['model20999'] + ['model%d' % i for i in range(20000, 11000, -1000)] + ['model10000', 'model5000']
    # the `checkpoint` file names the newest ten only, as without keep_every
    state = tf1.train.get_checkpoint_state(str(tmp_path))
    assert list(state.all_model_checkpoint_paths) == [str(tmp_path / n) for n in reversed(kept[:10])]
    np.testing.assert_array_equal(values(tmp_path / 'model5000')['v'], [5, 5, 5])
