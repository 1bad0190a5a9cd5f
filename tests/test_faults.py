"""Faults during long runs: damaged checkpoints, kills (during a save too), two runs on one folder,
a failing save. Real main.py processes, each resumed and compared with an uninterrupted run
(conftest's sinusoid_run); the bookkeeping behind them also in-process, on small checkpoints."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

import experiment
from tests.cli import REPO, run_main
from tests.conftest import SINUSOID_EXPERIMENT as EXP, SINUSOID_FLAGS as FLAGS, SINUSOID_ITERATIONS as TOTAL
from experiment import checkpoint_problem

tf1 = tf.compat.v1

# main.py with a fault injected into experiment.save_checkpoint at model{KILL_AT}: the process dies
# (os._exit, like kill -9: no handler, no cleanup) at KILL_POINT, or the save fails like a full disk.
FAULTY_MAIN = '''
import os, runpy, sys
sys.path.insert(0, os.getcwd())
import tensorflow as tf
import experiment
target, point = '.partial-model' + os.environ['KILL_AT'], os.environ['KILL_POINT']
final = 'model' + os.environ['KILL_AT'] + '.index'
real_files, real_replace, real_save = experiment.checkpoint_files, os.replace, tf.compat.v1.train.Saver.save
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
experiment.checkpoint_files, os.replace, tf.compat.v1.train.Saver.save = checkpoint_files, replace, save
sys.argv = ['main.py'] + sys.argv[1:]
runpy.run_path('main.py', run_name='__main__')
'''


def run_faulty(point, at, *args):
    env = dict(os.environ, KILL_POINT=point, KILL_AT=str(at), TF_CPP_MIN_LOG_LEVEL='3')
    return subprocess.run([sys.executable, '-c', FAULTY_MAIN, *args], cwd=str(REPO), env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture
def assert_same_weights(read_checkpoint):
    def check(path, reference):
        got = read_checkpoint(path)
        assert set(got) == set(reference) and any('Adam' in name for name in got)
        for name in reference:
            np.testing.assert_allclose(got[name], reference[name], atol=1e-6, err_msg=name)
    return check


def restored_from(result):
    lines = [line for line in result.stdout.splitlines() if line.startswith('Restoring model weights from ')]
    return os.path.basename(lines[-1].split()[-1]) if lines else None


@pytest.fixture
def finished(sinusoid_run):
    """The uninterrupted run: its folder and the final weights."""
    return sinusoid_run[0], sinusoid_run[2]


@pytest.fixture
def copy_of_finished(copy_of_sinusoid_run):
    return copy_of_sinusoid_run


def resume(logdir, total=TOTAL):
    return run_main(*FLAGS, '--metatrain_iterations=%d' % total, '--logdir=' + str(logdir))


# ------------------------------------------------------------------------------ damaged checkpoint
def damage(exp, how):
    """Damages the newest checkpoint (model2099) or the `checkpoint` file naming it."""
    if how == 'truncated data':
        with open(exp / 'model2099.data-00000-of-00001', 'r+b') as f:
            f.truncate(100)
    elif how == 'bad index':
        (exp / 'model2099.index').write_bytes(b'\0garbage' * 8)
    elif how == 'missing index':
        (exp / 'model2099.index').unlink()
    else:   # a stale checkpoint file
        (exp / 'checkpoint').write_text('model_checkpoint_path: "model9999"\n'
                                        'all_model_checkpoint_paths: "model9999"\n')


RESUMES = {   # damage: (the checkpoint training resumes from, what main.py prints about it)
    'truncated data': ('model2000', 'Checkpoint {exp}/model2099 is damaged'),
    'bad index': ('model2000', 'Checkpoint {exp}/model2099 is damaged'),
    'missing index': ('model2000', 'The checkpoint file names {exp}/model2099, which does not exist'),
    'stale checkpoint file': ('model2099', 'The checkpoint file names {exp}/model9999, which does not exist; '
                                           'using the newest intact checkpoint, {exp}/model2099'),
}


@pytest.mark.parametrize('how', list(RESUMES))
def test_training_resumes_from_the_newest_intact_checkpoint(copy_of_finished, capsys, how):
    """What main.py's start does with each damage (in-process: experiment.training_checkpoint)."""
    _, exp, _ = copy_of_finished
    damage(exp, how)
    resumes_from, line = RESUMES[how]
    path = experiment.training_checkpoint(str(exp))
    assert path == str(exp / resumes_from)
    printed = capsys.readouterr().out
    assert line.format(exp=exp) in printed, printed
    if 'damaged' in line:   # moved aside, never deleted
        moved = [l for l in printed.splitlines() if l.startswith('Checkpoint ')]
        assert len(moved) == 1 and 'moved its files to ' + str(exp / 'damaged') in moved[0]
        aside = moved[0].split('moved its files to ')[1].rstrip('.')
        assert sorted(os.listdir(aside)) == ['model2099.data-00000-of-00001', 'model2099.index']
        assert 'Resuming from {}.'.format(exp / 'model2000') in printed


@pytest.mark.parametrize('how', [pytest.param(how, marks=[pytest.mark.slow] if how != 'truncated data' else [])
                                 for how in RESUMES])
def test_damaged_newest_checkpoint_is_set_aside_and_training_redoes_what_was_lost(
        copy_of_finished, how, assert_same_weights):
    logdir, exp, final_weights = copy_of_finished
    damage(exp, how)
    resumes_from, line = RESUMES[how]
    total = TOTAL + 200 if how == 'stale checkpoint file' else TOTAL
    result = resume(logdir, total)
    assert result.returncode == 0, result.stderr[-3000:]
    assert line.format(exp=exp) in result.stdout, result.stdout
    assert restored_from(result) == resumes_from
    if resumes_from == 'model2000':
        assert_same_weights(exp / 'model2099', final_weights)       # the lost 99 iterations redone exactly
    else:
        assert (exp / 'model2299.index').is_file()
        assert 'model_checkpoint_path: "model2299"' in (exp / 'checkpoint').read_text()


def corrupt_in_place(exp):
    with open(exp / 'model2000.data-00000-of-00001', 'r+b') as f:
        f.seek(200)
        f.write(b'\xff' * 64)                                     # corrupted in place: a checksum error


def test_evaluating_a_damaged_test_iter_names_it_and_the_intact_ones(copy_of_finished):
    _, exp, _ = copy_of_finished
    corrupt_in_place(exp)
    with pytest.raises(experiment.UserError) as raised:
        experiment.evaluation_checkpoint(str(exp), test_iter=2000)
    message = str(raised.value)
    for needle in ('--test_iter=2000', str(exp / 'model2000'), 'damaged', 'intact: [1000, 2099]'):
        assert needle in message, message
    assert (exp / 'model2000.index').is_file()                    # evaluation moves nothing


@pytest.mark.slow
def test_evaluating_a_damaged_test_iter_through_main(copy_of_finished, one_line_error):
    logdir, exp, _ = copy_of_finished
    corrupt_in_place(exp)
    result = run_main(*FLAGS, '--train=False', '--test_iter=2000', '--logdir=' + str(logdir))
    line = one_line_error(result, '--test_iter=2000', str(exp / 'model2000'), 'damaged', '1000', '2099')
    assert 'intact: [1000, 2099]' in line
    assert (exp / 'model2000.index').is_file()


# ------------------------------------------------------------------------------ killed at any moment
@pytest.mark.slow
@pytest.mark.parametrize('point', ['after_write', 'between_renames', 'before_state'])
def test_killed_during_a_save_resumes_from_the_newest_complete_checkpoint(finished, tmp_path, point,
                                                                          assert_same_weights):
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


@pytest.mark.slow
def test_kill_9_near_a_save_loses_at_most_one_save_interval(finished, tmp_path, assert_same_weights):
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
@pytest.mark.slow
def test_a_second_run_on_a_live_folder_is_refused_and_a_killed_runs_lock_does_not_block(tmp_path, one_line_error):
    logdir = tmp_path / 'logs'
    first = subprocess.Popen([sys.executable, '-u', str(REPO / 'main.py'), *FLAGS,
                              '--metatrain_iterations=1000000', '--logdir=' + str(logdir)],
                             cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in first.stdout:
            if line.startswith('Iteration 2000:'):   # printed after model1000 was saved
                break
        started = time.time()
        second = run_main(*FLAGS, '--metatrain_iterations=1000000', '--logdir=' + str(logdir))
        one_line_error(second, 'another training run', 'pid {}'.format(first.pid), str(logdir / EXP))
        assert time.time() - started < 60 and 'Done initializing' not in second.stdout
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    earlier = sorted(p.name for p in (logdir / EXP).glob('model*.index'))
    assert 'model1000.index' in earlier
    third = run_main(*FLAGS, '--metatrain_iterations=50', '--resume=False', '--logdir=' + str(logdir))
    assert third.returncode == 0, third.stderr[-3000:]
    assert sorted(p.name for p in (logdir / EXP).glob('model*.index')) == ['model49.index']
    # What the killed run saved is set aside, not deleted.
    assert '--resume=False: moved the {} earlier checkpoint(s) to'.format(len(earlier)) in third.stdout
    assert sorted(p.name for p in (logdir / EXP / 'previous').glob('*/model*.index')) == earlier


def test_the_lock_refuses_a_second_holder_and_dies_with_its_process(tmp_path):
    """lock_experiment in-process against a holder in another process: refused with its pid while it
    lives; once it is killed (-9: no cleanup) the lock is free."""
    holder = subprocess.Popen([sys.executable, '-c', HOLD_LOCK, str(REPO), str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        with pytest.raises(experiment.UserError, match='another training run \\(pid {} on'.format(holder.pid)):
            experiment.lock_experiment(str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    fd = experiment.lock_experiment(str(tmp_path))
    try:
        assert (tmp_path / '.lock').read_text().startswith('pid {} on'.format(os.getpid()))
    finally:
        experiment._held_locks.remove(fd)
        os.close(fd)


HOLD_LOCK = """import sys, time
sys.path.insert(0, sys.argv[1])
from experiment import lock_experiment
lock_experiment(sys.argv[2])
print('locked', flush=True)
time.sleep(600)
"""


# ------------------------------------------------------------------------------ a failing save
@pytest.mark.slow
def test_a_failing_save_stops_with_one_line_and_keeps_the_earlier_checkpoints(tmp_path, one_line_error):
    logdir = tmp_path / 'logs'
    result = run_faulty('disk_full', 2000, *FLAGS, '--metatrain_iterations=%d' % TOTAL, '--logdir=' + str(logdir))
    exp = logdir / EXP
    one_line_error(result, 'could not save checkpoint model2000 at iteration 2000', str(exp),
                          'No space left on device', 'intact')
    assert sorted(os.listdir(exp)) == ['.lock', 'checkpoint', 'model1000.data-00000-of-00001', 'model1000.index',
                                     'moments_stop_gradient.txt']
    assert checkpoint_problem(str(exp / 'model1000')) is None
    assert 'model_checkpoint_path: "model1000"' in (exp / 'checkpoint').read_text()
    resumed = resume(logdir)
    assert resumed.returncode == 0 and restored_from(resumed) == 'model1000', resumed.stderr[-3000:]


@pytest.mark.slow
def test_an_unwritable_experiment_folder_mid_run_is_a_failed_save(tmp_path, one_line_error):
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
    one_line_error(result, 'could not save checkpoint model1000 at iteration 1000', str(exp))


def save_counter_checkpoints(counter, folder, iterations, keep_every=0):
    """save_checkpoint of the counter v (v = how many saves so far) at each of `iterations`; returns
    the names of the checkpoints left in folder, the newest first."""
    saver, sess, step = counter
    for itr in iterations:
        sess.run(step)
        saved = experiment.save_checkpoint(saver, sess, str(folder), itr, keep_every=keep_every)
        assert saved == str(folder / ('model%d' % itr))
    return [os.path.basename(p) for p in experiment.list_checkpoints(str(folder))]


def test_save_checkpoint_keeps_the_newest_ten_and_names_them_in_the_checkpoint_file(counter, tmp_path, read_checkpoint):
    kept = save_counter_checkpoints(counter, tmp_path, range(0, 13000, 1000))
    assert kept == ['model%d' % i for i in range(12000, 2000, -1000)]
    assert sorted(os.listdir(tmp_path)) == sorted(['checkpoint'] + [n + suffix for n in kept for suffix in (
        '.index', '.data-00000-of-00001')])
    state = tf1.train.get_checkpoint_state(str(tmp_path))      # relative names, read back as paths
    assert (tmp_path / 'checkpoint').read_text().startswith('model_checkpoint_path: "model12000"\n')
    assert list(state.all_model_checkpoint_paths) == [str(tmp_path / n) for n in reversed(kept)]
    assert tf1.train.latest_checkpoint(str(tmp_path)) == str(tmp_path / 'model12000')
    np.testing.assert_array_equal(read_checkpoint(tmp_path / 'model12000')['v'], [13, 13, 13])


def test_save_checkpoint_keeps_every_multiple_of_keep_every_besides_the_newest_ten(counter, tmp_path, read_checkpoint):
    kept = save_counter_checkpoints(counter, tmp_path, list(range(1000, 21000, 1000)) + [20999], keep_every=5000)
    assert kept == ['model20999'] + ['model%d' % i for i in range(20000, 11000, -1000)] + ['model10000', 'model5000']
    # the `checkpoint` file names the newest ten only, as without keep_every
    state = tf1.train.get_checkpoint_state(str(tmp_path))
    assert list(state.all_model_checkpoint_paths) == [str(tmp_path / n) for n in reversed(kept[:10])]
    np.testing.assert_array_equal(read_checkpoint(tmp_path / 'model5000')['v'], [5, 5, 5])


# ------------------------------------------------------------------------------ the same, in-process
class Killed(BaseException):
    """Stands for kill -9 at a point of save_checkpoint: nothing after it runs, no handler cleans up."""


@pytest.fixture
def counter(tmp_path):
    """(saver, session, step op) of a graph holding one counter variable."""
    with tf.Graph().as_default():
        variable = tf1.get_variable('v', [3], initializer=tf1.zeros_initializer())
        step = tf1.assign_add(variable, tf.ones([3]))
        saver = tf1.train.Saver(max_to_keep=None)
        with tf1.Session() as sess:
            sess.run(tf1.global_variables_initializer())
            yield saver, sess, step


def kill_saving(monkeypatch, point, itr):
    """Makes save_checkpoint of model{itr} die at `point`, as FAULTY_MAIN does in a real run."""
    real_files, real_replace = experiment.checkpoint_files, os.replace
    final = 'model{}.index'.format(itr)

    def checkpoint_files(path):
        if point == 'after_write' and path.endswith('.partial-model{}'.format(itr)):
            raise Killed
        return real_files(path)

    def replace(src, dst):
        if point == 'between_renames' and dst.endswith(final):
            raise Killed
        real_replace(src, dst)
        if point == 'before_state' and dst.endswith(final):
            raise Killed
    monkeypatch.setattr(experiment, 'checkpoint_files', checkpoint_files)
    monkeypatch.setattr(experiment.os, 'replace', replace)


@pytest.mark.parametrize('point, resumes_from, partial_files', [
    ('after_write', 'model1000', 2), ('between_renames', 'model1000', 1), ('before_state', 'model2000', 0)])
def test_a_save_killed_at_any_point_resumes_from_the_newest_complete_checkpoint(
        counter, tmp_path, monkeypatch, capsys, read_checkpoint, point, resumes_from, partial_files):
    saver, sess, step = counter
    sess.run(step)
    experiment.save_checkpoint(saver, sess, str(tmp_path), 1000)
    sess.run(step)
    with monkeypatch.context() as patched:
        kill_saving(patched, point, 2000)
        with pytest.raises(Killed):
            experiment.save_checkpoint(saver, sess, str(tmp_path), 2000)
    assert 'model_checkpoint_path: "model1000"' in (tmp_path / 'checkpoint').read_text()
    capsys.readouterr()
    path = experiment.training_checkpoint(str(tmp_path))
    assert path == str(tmp_path / resumes_from)
    printed = capsys.readouterr().out
    removed = re.findall(r'Removed (\d+) temporary file\(s\) of a save that was interrupted', printed)
    assert [int(n) for n in removed] == ([partial_files] if partial_files else []), printed
    assert not [f for f in os.listdir(tmp_path) if f.startswith('.partial')]
    saves_before = {'model1000': 1, 'model2000': 2}[resumes_from]
    assert read_checkpoint(path)['v'].tolist() == [saves_before] * 3


def test_a_failing_save_raises_one_line_and_keeps_the_earlier_checkpoints(counter, tmp_path):
    saver, sess, step = counter
    sess.run(step)
    experiment.save_checkpoint(saver, sess, str(tmp_path), 1000)

    class FullDisk:
        def save(self, sess, path, **kwargs):
            open(path + '.index', 'w').close()          # a part written, then the disk is full
            raise OSError(28, 'No space left on device')
    with pytest.raises(experiment.UserError) as raised:
        experiment.save_checkpoint(FullDisk(), sess, str(tmp_path), 2000)
    message = str(raised.value)
    assert '\n' not in message
    for needle in ('could not save checkpoint model2000 at iteration 2000', str(tmp_path), 'No space left on device',
                   'intact', 'rerun the same command'):
        assert needle in message, message
    assert sorted(os.listdir(tmp_path)) == ['checkpoint', 'model1000.data-00000-of-00001', 'model1000.index']
    assert checkpoint_problem(str(tmp_path / 'model1000')) is None


def test_a_save_into_a_folder_that_became_a_file_raises_one_line(counter, tmp_path):
    saver, sess, _ = counter
    folder = tmp_path / 'exp'
    folder.write_text('not a folder any more')
    with pytest.raises(experiment.UserError, match='could not save checkpoint model1000 at iteration 1000 in ' +
                       re.escape(str(folder))):
        experiment.save_checkpoint(saver, sess, str(folder), 1000)
