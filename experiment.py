"""An experiment's bookkeeping: its folder and name, checkpoints (save, intact, damaged, keep), the lock
that keeps two runs off one folder, progress lines, and the one-line errors a user sees.

Importable without TensorFlow (reproduce.py and the data scripts use it); the few functions that
read or write checkpoints import it when they are called.
"""
import fcntl
import os
import re
import socket
import time


class UserError(Exception):
    """Bad input from the user: main.py prints the message as one line and exits non-zero."""


PREPARE_HINT = {
    'omniglot': 'python data/prepare_omniglot.py --from DIR_WITH_THE_TWO_ZIPS (or without --from to download)',
    'miniimagenet': 'python data/prepare_miniimagenet.py --from DIR_WITH_images_AND_CSVS',
}
PREPARED_FOLDER = {'omniglot': 'omniglot_resized', 'miniimagenet': 'miniImagenet'}


## The experiment's folder
def experiment_name(num_classes, meta_batch_size, update_batch_size, num_updates, update_lr,
                    num_filters=64, max_pool=False, stop_grad=False, baseline=None, norm='batch_norm'):
    """The reference's `exp_string`: the folder under --logdir of one experiment's files."""
    name = 'cls_{}.mbs_{}.ubs_{}.numstep{}.updatelr{}'.format(
        num_classes, meta_batch_size, update_batch_size, num_updates, update_lr)
    if num_filters != 64:
        name += 'hidden' + str(num_filters)
    if max_pool:
        name += 'maxpool'
    if stop_grad:
        name += 'stopgrad'
    if baseline:
        name += baseline
    name += {'batch_norm': 'batchnorm', 'layer_norm': 'layernorm', 'None': 'nonorm'}[norm]
    return name


def ensure_writable(folder):
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, '.write_test')
        with open(probe, 'w'):
            pass
        os.remove(probe)
    except OSError as error:
        raise UserError('cannot write to {} ({}); pass a writable --logdir'.format(
            folder, error.strerror or error))


MOMENTS_RECORD = 'moments_stop_gradient.txt'


def record_moments_choice(moments_stop_gradient, exp_dir, checkpoint):
    """Keeps one run's meta-gradient math the same across resumes: the run's folder records
    --moments_stop_gradient, and resuming with the other value is an error."""
    path = os.path.join(exp_dir, MOMENTS_RECORD)
    chosen = str(bool(moments_stop_gradient))
    recorded = open(path).read().strip() if os.path.isfile(path) else None
    if checkpoint and recorded is not None and recorded != chosen:
        raise UserError('{} was trained with --moments_stop_gradient={}; pass that again to resume it, or '
                        '--resume=False to start over'.format(exp_dir, recorded))
    if checkpoint and recorded is None:
        print('Resuming a run from before --moments_stop_gradient was recorded: it continues with '
              '--moments_stop_gradient={} (this port always stopped that gradient before).'.format(chosen))
    if recorded != chosen:
        with open(path, 'w') as out:
            out.write(chosen + '\n')


## Checkpoints
_CHECKPOINT_NAME = re.compile(r'^model(\d+)$')
CHECKPOINTS_KEPT = 10
_PARTIAL_PREFIX = '.partial-'     # a save in progress: renamed to model{N} once complete


def checkpoint_iteration(path):
    """The N of a checkpoint `.../model{N}`, read from its file name only (not the whole path)."""
    match = _CHECKPOINT_NAME.match(os.path.basename(str(path)))
    if not match:
        raise UserError('checkpoint {} is not named model<N>'.format(path))
    return int(match.group(1))


def list_checkpoints(exp_dir):
    """Every complete model{N} in exp_dir (it has an index), the newest first."""
    if not os.path.isdir(exp_dir):
        return []
    names = {f[:-len('.index')] for f in os.listdir(exp_dir) if f.endswith('.index')}
    paths = [os.path.join(exp_dir, n) for n in names if _CHECKPOINT_NAME.match(n)]
    return sorted(paths, key=checkpoint_iteration, reverse=True)


def checkpoint_problem(path):
    """None if every tensor of checkpoint `path` reads back (checksums included), else why not."""
    import tensorflow as tf
    try:
        reader = tf.compat.v1.train.load_checkpoint(path)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except Exception as error:  # noqa: BLE001  damage shows as OpError, IndexError, ValueError...
        lines = str(error).strip().splitlines()
        return '{}: {}'.format(type(error).__name__, lines[0][:160] if lines else 'unreadable')
    return None


def newest_intact_checkpoint(exp_dir):
    """(the newest checkpoint that reads back whole or None, [(newer damaged path, why)])."""
    damaged = []
    for path in list_checkpoints(exp_dir):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, damaged
        damaged.append((path, problem))
    return None, damaged


def named_checkpoint(exp_dir, iteration):
    """model{iteration} of exp_dir for --test_iter, checked whole; UserError naming the usable ones."""
    path = os.path.join(exp_dir, 'model' + str(iteration))
    problem = None if os.path.isfile(path + '.index') else 'no checkpoint'
    problem = problem or checkpoint_problem(path)
    if problem:
        intact = [checkpoint_iteration(p) for p in list_checkpoints(exp_dir) if not checkpoint_problem(p)]
        what = 'no checkpoint {}'.format(path) if problem == 'no checkpoint' else \
            'checkpoint {} is damaged ({})'.format(path, problem)
        raise UserError('--test_iter={}: {} (intact: {}); pass one of those or -1 for the newest'.format(
            iteration, what, sorted(intact) or 'none'))
    return path


def checkpoint_state_names(exp_dir):
    """The checkpoint that exp_dir's `checkpoint` file names as the newest, or None."""
    try:
        with open(os.path.join(exp_dir, 'checkpoint')) as f:
            match = re.search(r'^model_checkpoint_path: "([^"]*)"', f.read(), re.M)
    except OSError:
        return None
    return os.path.join(exp_dir, match.group(1)) if match else None


def checkpoint_files(path):
    folder, name = os.path.split(path)
    return [os.path.join(folder, f) for f in os.listdir(folder)
            if f == name + '.index' or f.startswith(name + '.data-')]


def move_checkpoint_aside(path, folder):
    """Moves the files of checkpoint `path` into `folder` (created); never deletes them."""
    os.makedirs(folder, exist_ok=True)
    for f in checkpoint_files(path):
        os.replace(f, os.path.join(folder, os.path.basename(f)))


def remove_partial_saves(exp_dir):
    """Deletes the temporaries of saves that a killed process left; returns how many files."""
    if not os.path.isdir(exp_dir):
        return 0
    partial = [f for f in os.listdir(exp_dir) if f.startswith(_PARTIAL_PREFIX)]
    for f in partial:
        os.remove(os.path.join(exp_dir, f))
    return len(partial)


def save_checkpoint(saver, sess, exp_dir, itr, keep=CHECKPOINTS_KEPT, keep_every=0):
    """Saves model{itr} so that no kill, full disk or vanished folder leaves a half-written newest one.

    The saver writes under a temporary name; the data files, then the index are renamed into place
    (a checkpoint counts only once its index exists), then the `checkpoint` file names it, then all
    but the `keep` newest are deleted, except (with keep_every > 0) those whose N is a multiple of
    keep_every. A failure removes the temporaries and raises UserError: the earlier checkpoints are
    untouched.
    """
    import tensorflow as tf
    name = 'model' + str(itr)
    final, partial = os.path.join(exp_dir, name), os.path.join(exp_dir, _PARTIAL_PREFIX + name)
    try:
        saver.save(sess, partial, write_meta_graph=False, write_state=False)
        written = checkpoint_files(partial)
        for f in written:
            with open(f, 'rb') as handle:
                os.fsync(handle.fileno())
        if os.path.exists(final + '.index'):
            os.remove(final + '.index')
        for f in sorted(written, key=lambda f: f.endswith('.index')):     # the index last
            os.replace(f, final + f[len(partial):])
        kept = list_checkpoints(exp_dir)
        tf.compat.v1.train.update_checkpoint_state(exp_dir, name, [os.path.basename(p) for p in reversed(kept[:keep])])
        for old in kept[keep:]:
            if keep_every > 0 and checkpoint_iteration(old) % keep_every == 0:
                continue
            for f in checkpoint_files(old):
                os.remove(f)
    except (tf.errors.OpError, OSError, ValueError) as error:
        try:
            for f in checkpoint_files(partial):
                os.remove(f)
        except OSError:
            pass
        reason = getattr(error, 'strerror', None) or getattr(error, 'message', None) or str(error)
        raise UserError('could not save checkpoint {} at iteration {} in {} ({}); training stopped, the '
                        'checkpoints before it are intact; free space or fix the folder, then rerun the same '
                        'command to resume'.format(name, itr, exp_dir, reason.strip().splitlines()[0][:160]))
    return final


def training_checkpoint(exp_dir, resume=True, test_iter=-1):
    """The checkpoint training resumes from: the newest intact one (damaged newer ones are moved
    aside, never deleted), model{test_iter} if given, or none without `resume` (the earlier ones are
    moved aside)."""
    removed = remove_partial_saves(exp_dir)
    if removed:
        print('Removed {} temporary file(s) of a save that was interrupted.'.format(removed))
    if not resume:
        previous = list_checkpoints(exp_dir)
        if previous:
            aside = os.path.join(exp_dir, 'previous', time.strftime('%Y%m%d-%H%M%S'))
            for path in previous:
                move_checkpoint_aside(path, aside)
            print('--resume=False: moved the {} earlier checkpoint(s) to {}.'.format(len(previous), aside))
        return None
    if test_iter > 0:
        return named_checkpoint(exp_dir, test_iter)
    path, damaged = newest_intact_checkpoint(exp_dir)
    if damaged:
        aside = os.path.join(exp_dir, 'damaged', time.strftime('%Y%m%d-%H%M%S'))
        for bad, why in damaged:
            move_checkpoint_aside(bad, aside)
            print('Checkpoint {} is damaged ({}): moved its files to {}.'.format(bad, why, aside))
        print('Resuming from {}.'.format(path) if path else 'No intact checkpoint left: training starts over.')
    named = checkpoint_state_names(exp_dir)
    if named and not os.path.isfile(named + '.index') and named not in [bad for bad, _ in damaged]:
        print('The checkpoint file names {}, which does not exist; using the newest intact checkpoint, {}.'.format(
            named, path))
    return path


def evaluation_checkpoint(exp_dir, test_iter=-1):
    """The checkpoint an evaluation restores: model{test_iter}, else the newest intact one."""
    if test_iter > 0:
        return named_checkpoint(exp_dir, test_iter)
    path, damaged = newest_intact_checkpoint(exp_dir)
    for bad, why in damaged:
        print('Skipping damaged checkpoint {} ({}).'.format(bad, why))
    if path is None:
        raise UserError('no {}checkpoint to evaluate in {}; train first with the same flags and --train=True, '
                        'or point --logdir at the training run'.format('intact ' if damaged else '', exp_dir))
    return path


def restore(sess, path, full_state):
    """Restores weights (and, with full_state, the optimizer state) saved under their names; returns
    whether the optimizer state was restored.

    Checkpoints of the reference hold the trainable variables only: they restore, and training
    then starts Adam afresh.
    """
    import tensorflow as tf
    tf1 = tf.compat.v1
    stored = {name for name, _ in tf1.train.list_variables(path)}
    weights = {v.op.name: v for v in tf1.trainable_variables()}
    missing = sorted(set(weights) - stored)
    if missing:
        raise UserError('checkpoint {} lacks {} (and {} more) of this model: it was trained with other flags; '
                        'use the training run\'s flags'.format(path, missing[0], len(missing) - 1))
    everything = {v.op.name: v for v in tf1.global_variables()}
    if full_state and set(everything) <= stored:
        tf1.train.Saver(everything).restore(sess, path)
        return True
    tf1.train.Saver(weights).restore(sess, path)
    return False


## One run per folder
def lock_experiment(exp_dir):
    """Takes exp_dir for this training process (until it exits); UserError if another run holds it.

    The lock is an flock on EXP/.lock, which the kernel releases when its process dies, even
    by kill -9: a stale lock never blocks the next start.
    """
    path = os.path.join(exp_dir, '.lock')
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 200).decode(errors='replace').strip() or 'a process'
        os.close(fd)
        raise UserError('another training run ({}) is writing {}; wait for it to finish or stop it '
                        '(Ctrl-C saves and stops it) before starting this one'.format(holder, exp_dir))
    os.ftruncate(fd, 0)
    os.write(fd, 'pid {} on {}'.format(os.getpid(), socket.gethostname()).encode())
    _held_locks.append(fd)
    return fd


_held_locks = []


## Progress
class Progress:
    """Iterations per second and time left, measured over the last print interval."""

    def __init__(self, first_itr, last_itr):
        self.last_itr = last_itr
        self._mark = (first_itr, time.time())

    def line(self, itr):
        start_itr, start_time = self._mark
        now = time.time()
        self._mark = (itr, now)
        rate = (itr - start_itr) / max(now - start_time, 1e-9)
        left = (self.last_itr - itr) / rate if rate > 0 else float('inf')
        return '{:.1f} it/s, {} left'.format(rate, format_seconds(left))


def format_seconds(seconds):
    """H:MM:SS, or '?' for an unknown (infinite) time."""
    if seconds == float('inf'):
        return '?'
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return '{}:{:02d}:{:02d}'.format(hours, rest // 60, rest % 60)
