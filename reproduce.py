"""Reproduces the rows of the MAML paper's tables, one command per row, and writes RESULTS.md.

    python reproduce.py --list
    python reproduce.py ROW [ROW ...] [--iterations N]     e.g. omniglot_5w1s, sinusoid, all

For each row: trains with exactly the paper's command from main.py's usage block (its own
--logdir under logs/reproduce/ROW/; rerunning resumes), evaluates the 600 test tasks with
`--train=False --test_set=True`, takes the number the paper reports from the CSV that wrote
(Omniglot 5-way after 3 inner steps, 20-way after 5, MiniImagenet after 10, sinusoid MSE after 1, 5
and 10), and rewrites that row of RESULTS.md beside the paper's number with the iterations trained,
the wall time, the machine, the date and the commit. `--iterations N` trains a shorter budget,
which the row says; running again with a larger one (or none) continues the same run.
`--reference_eval` also evaluates the same checkpoint with the reference's own code (TF 1.15; where
its code and venv are found: bench/reference.py) and records both numbers side by side. Omniglot rows
take the prepared data/omniglot_resized (--data_root), else prepare it from $MAML_OMNIGLOT_ZIPS.
`--validate_checkpoints` evaluates every kept checkpoint on 600 validation tasks and the best of
them on the test tasks (a table of its own; the row stays the last checkpoint).
RESULTS.md is rendered entirely from the data block at its end, which only this runner writes.
"""
import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from experiment import PREPARE_HINT, PREPARED_FOLDER, UserError, checkpoint_iteration, format_seconds

REPO = Path(__file__).resolve().parent
KEEP_CHECKPOINT_EVERY = 5000   # besides the newest 10: the run's earlier points, for --validate_checkpoints
SINE_MAML = ['--datasource=sinusoid', '--metatrain_iterations=70000', '--norm=None']
SINE_PRETRAIN = ['--datasource=sinusoid', '--pretrain_iterations=70000', '--metatrain_iterations=0', '--norm=None']
OMNIGLOT_5WAY = ['--datasource=omniglot', '--metatrain_iterations=60000', '--meta_batch_size=32',
                 '--update_batch_size=1', '--update_lr=0.4', '--num_updates=1']
OMNIGLOT_20WAY = ['--datasource=omniglot', '--metatrain_iterations=60000', '--meta_batch_size=16',
                  '--update_batch_size=1', '--num_classes=20', '--update_lr=0.1', '--num_updates=5']
MINI = ['--datasource=miniimagenet', '--metatrain_iterations=60000', '--meta_batch_size=4',
        '--update_batch_size=1', '--update_lr=0.01', '--num_updates=5', '--num_classes=5',
        '--num_filters=32', '--max_pool=True']


def with_flag(flags, name, value):
    """`flags` with --name set to value: replaced in place where present, appended otherwise."""
    flag = '--%s=%s' % (name, value)
    if any(f.startswith('--%s=' % name) for f in flags):
        return [flag if f.startswith('--%s=' % name) else f for f in flags]
    return flags + [flag]


@dataclass
class Row:
    """One row of a paper table: the command that trains it and the numbers it is judged by."""
    name: str
    table: str              # 'sinusoid', 'omniglot' or 'miniimagenet'
    label: str
    flags: list
    steps: tuple            # inner steps whose evaluation the paper reports (CSV columns updateN)
    paper: tuple = ()       # per step: (mean, ci95) or (mean, None) or None
    note: str = ''
    data: str = None        # 'omniglot' / 'miniimagenet': the prepared folder it needs
    tune_step_size: tuple = ()   # candidate fine-tuning step sizes, the best on validation tasks evaluated

    @property
    def iteration_flag(self):
        return 'pretrain_iterations' if '--metatrain_iterations=0' in self.flags else 'metatrain_iterations'

    def flag(self, name, default=None):
        return dict(f[2:].split('=', 1) for f in self.flags).get(name, default)

    @property
    def paper_iterations(self):
        return int(self.flag(self.iteration_flag))

    def command(self, iterations=None):
        return self.flags if iterations is None else with_flag(self.flags, self.iteration_flag, iterations)



# The pre-trained baseline's fine-tuning step size: "fine-tuning with gradient descent on the K provided
# points, using an automatically tuned step size" (the paper, Section 5.1; Figure 2's caption: "with a
# tuned step size"), no value given. The runner tunes it the same way for its own rows: the candidate with
# the lowest mean MSE after 10 steps on 600 validation tasks (drawn apart from the test tasks).
TUNED_STEP_SIZES = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3)
SINE_VALIDATION_SEED = 12345   # the test tasks: numpy seeded with 1, as the reference


def sine_rows():
    rows = []
    # K=5: the paper's Table 2 (Appendix C.1, "5-shot mean squared error"); K=10: read off Figure 3.
    paper_k5 = {'maml': ((0.67, None), (0.38, None), (0.35, None)),
                'pretrained': ((2.41, None), (2.23, None), (2.19, None))}
    paper_k10 = {'maml': ((0.4, None), None, None)}   # the K=10 curve: about 0.4 after one step
    for k, paper in ((10, paper_k10), (5, paper_k5)):
        kflag = '--update_batch_size=%d' % k
        rows += [
            Row('sine_k%d_maml' % k, 'sinusoid', 'MAML, K=%d, alpha 0.01 (paper)' % k,
                SINE_MAML + [kflag, '--update_lr=0.01'], (1, 5, 10), paper.get('maml', ()),
                'the paper\'s step size: usage block command plus --update_lr=0.01'),
            Row('sine_k%d_maml_usage' % k, 'sinusoid', 'MAML, K=%d, alpha 0.001 (usage block)' % k,
                SINE_MAML + [kflag], (1, 5, 10), (),
                'the usage block\'s command as written: flag default --update_lr=0.001'),
            Row('sine_k%d_pretrained' % k, 'sinusoid', 'pre-trained, K=%d, alpha 0.001' % k,
                SINE_PRETRAIN + [kflag], (1, 5, 10), (),
                'usage block baseline; fine-tuned at test time with the flag default alpha'),
            Row('sine_k%d_pretrained_tuned' % k, 'sinusoid', 'pre-trained, K=%d, tuned step size (paper)' % k,
                SINE_PRETRAIN + [kflag], (1, 5, 10), paper.get('pretrained', ()),
                'usage block baseline, fine-tuned at test time with the step size of {} that does best on '
                'validation tasks, as the paper tuned it'.format('/'.join(map(str, TUNED_STEP_SIZES))),
                tune_step_size=TUNED_STEP_SIZES),
            Row('sine_k%d_oracle' % k, 'sinusoid', 'oracle, K=%d, alpha 0.001 (its number: before adapting)' % k,
                SINE_PRETRAIN + [kflag, '--baseline=oracle'], (1, 5, 10), (),
                'usage block baseline: amplitude and phase as inputs, so it needs no adaptation'),
        ]
    return rows


def image_rows():
    pct = lambda mean, ci: (mean / 100.0, ci / 100.0)
    rows = []
    for shots, o5, o20 in ((1, (98.7, 0.4), (95.8, 0.3)), (5, (99.9, 0.1), (98.9, 0.2))):
        rows.append(Row('omniglot_5w%ds' % shots, 'omniglot', 'Omniglot 5-way %d-shot' % shots,
                        with_flag(OMNIGLOT_5WAY, 'update_batch_size', shots), (3,), (pct(*o5),),
                        'trained with 1 step of 0.4, evaluated after 3', data='omniglot'))
        if shots == 1:
            rows.append(Row('omniglot_5w1s_tf13_moments', 'omniglot',
                            'Omniglot 5-way 1-shot, batch norm moments as TF >= 1.3 computes them',
                            OMNIGLOT_5WAY + ['--moments_stop_gradient=True'], (3,), (pct(*o5),),
                            'the paper\'s command with the meta-gradient the reference gets on TF >= 1.3 and the '
                            'golden cases pin (not the paper\'s: TF 1.1/1.2, exact)', data='omniglot'))
        rows.append(Row('omniglot_20w%ds' % shots, 'omniglot', 'Omniglot 20-way %d-shot' % shots,
                        with_flag(OMNIGLOT_20WAY, 'update_batch_size', shots), (5,), (pct(*o20),),
                        'trained and evaluated with 5 steps of 0.1', data='omniglot'))
    for shots, second, first in ((1, (48.70, 1.84), (48.07, 1.75)), (5, (63.11, 0.92), (63.15, 0.91))):
        flags = with_flag(MINI, 'update_batch_size', shots)
        rows.append(Row('mini_5w%ds' % shots, 'miniimagenet', 'MiniImagenet 5-way %d-shot' % shots,
                        flags, (10,), (pct(*second),),
                        'trained with 5 steps of 0.01, evaluated after 10', data='miniimagenet'))
        rows.append(Row('mini_5w%ds_first_order' % shots, 'miniimagenet',
                        'MiniImagenet 5-way %d-shot, first order' % shots,
                        flags + ['--stop_grad=True'], (10,), (pct(*first),),
                        'as above with --stop_grad=True', data='miniimagenet'))
    return rows


ROWS = {row.name: row for row in sine_rows() + image_rows()}
GROUPS = {'all': list(ROWS), **{t: [r.name for r in ROWS.values() if r.table == t]
                                 for t in ('sinusoid', 'omniglot', 'miniimagenet')}}


## Running one row
@dataclass
class RunState:
    """What the runner keeps about one row between invocations (logs/reproduce/ROW/runner.json)."""
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    commits: list = field(default_factory=list)
    curve: dict = field(default_factory=dict)       # iteration -> [pre, post] validation accuracy
    evaluated: str = None                           # checkpoint the last evaluation used
    validation: dict = field(default_factory=dict)  # checkpoint N -> numbers on the validation tasks
    best_test: dict = None                          # the best-validation checkpoint's test numbers

    @classmethod
    def load(cls, path):
        if not path.is_file():
            return cls()
        return cls(**json.loads(path.read_text()))

    def save(self, path):
        partial = path.with_suffix('.partial')
        partial.write_text(json.dumps(self.__dict__, indent=1))
        os.replace(partial, path)


class RunnerError(Exception):
    """A row cannot run: printed as one line."""


def git_commit():
    try:
        commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--', '*.py'], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return commit + ('+changes' if dirty else '')
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    try:
        from importlib.metadata import version
        tf_version = version('tensorflow')
    except Exception:   # noqa: BLE001  (any packaging problem: the figure is informative only)
        tf_version = '?'
    return '{}, {} cores, TF {}'.format(cpu, os.cpu_count(), tf_version)


def run_main(flags, log_path, on_line=None):
    """main.py with `flags` in its own process group, output echoed and appended to log_path.

    Ctrl-C or SIGTERM to the runner is passed on once, so main.py saves and stops cleanly.
    Returns (exit code, stdout lines, seconds, stopped by a signal)."""
    command = [sys.executable, '-u', str(REPO / 'main.py')] + flags
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get('TF_CPP_MIN_LOG_LEVEL', '3'))
    start = time.time()
    lines, stopped = [], []
    with open(log_path, 'a') as log:
        log.write('\n$ {}\n'.format(' '.join(command)))
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)

        def forward(signum, frame):
            if not stopped:
                stopped.append(signum)
                process.send_signal(signal.SIGINT)
        previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for line in process.stdout:
                sys.stdout.write(line)
                log.write(line)
                log.flush()
                lines.append(line.rstrip('\n'))
                if on_line:
                    on_line(lines[-1])
            code = process.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    return code, lines, time.time() - start, bool(stopped)


def main_error(lines):
    errors = [line for line in lines if line.startswith('error:')]
    return errors[-1][len('error: '):] if errors else (lines[-1] if lines else 'main.py failed')


def train_row(row, flags, folder, state, state_path):
    """Trains (or resumes) the row. The state (wall time, validation curve) is saved at every
    progress line too, so a runner killed outright loses at most one print interval of it."""
    last_iteration = [None]
    seconds_before, start = state.train_seconds, time.time()

    def track(line):
        match = re.match(r'^(?:Pretrain )?Iteration (\d+):', line)
        if match:
            last_iteration[0] = int(match.group(1))
            if commit not in state.commits:   # this commit trained some of the row
                state.commits.append(commit)
        validation = re.match(r'^Validation results: (\S+), (\S+)$', line)
        if validation and last_iteration[0] is not None:
            state.curve[str(last_iteration[0])] = [float(validation.group(1)), float(validation.group(2))]
        if match or validation:
            state.train_seconds = seconds_before + time.time() - start
            state.save(state_path)

    commit = git_commit()
    code, lines, seconds, stopped = run_main(flags, folder / 'train.log', track)
    finished_before = any(line.startswith('Training already finished') for line in lines)
    state.train_seconds = seconds_before + (0 if finished_before else seconds)
    state.save(state_path)
    if stopped:
        raise KeyboardInterrupt
    if code != 0:
        raise RunnerError(main_error(lines))


def evaluate_row(row, flags, folder, state, state_path):
    """Evaluates the newest checkpoint unless it was already (with a tuned step size, after tuning
    it); returns the CSV's path and the checkpoint."""
    newest = newest_checkpoint(folder)
    done = state.evaluated and Path(state.evaluated['csv']).is_file() and state.evaluated['checkpoint'] == newest
    if done:
        return Path(state.evaluated['csv']), state.evaluated['checkpoint']
    eval_flags = flags + ['--train=False', '--test_set=True']
    tuned = None
    if row.tune_step_size:
        tuned = tune_step_size(row, newest, row.tune_step_size)
        trained_with = row.flag('update_lr', '0.001')
        eval_flags = with_flag(eval_flags, 'update_lr', tuned['chosen']) + ['--train_update_lr=' + trained_with]
    checkpoint, csv_path, seconds = run_evaluation(eval_flags, folder / 'eval.log')
    state.eval_seconds = seconds
    state.evaluated = {'checkpoint': checkpoint, 'csv': csv_path, 'step_size': tuned}
    state.save(state_path)
    return Path(csv_path), checkpoint


def tune_step_size(row, checkpoint, candidates, tasks=600, steps=10):
    """The fine-tuning step size among `candidates` with the lowest mean MSE after `steps` gradient
    steps on `tasks` sinusoid tasks drawn with SINE_VALIDATION_SEED (not the test tasks), the model
    restored from `checkpoint`: {'chosen': step size, 'validation_mse': {step size: mean MSE}}."""
    print('== {}: tuning the fine-tuning step size on {} validation tasks'.format(row.name, tasks), flush=True)
    mse = {}
    for step_size in candidates:
        after = sinusoid_adaptation(checkpoint, row, step_size, tasks, steps, SINE_VALIDATION_SEED)
        mse[str(step_size)] = float(after[steps]) if np.isfinite(after[steps]) else float('inf')
    chosen = min(candidates, key=lambda a: mse[str(a)])
    print('   mean MSE after {} steps: {}; chosen: {}'.format(
        steps, ', '.join('{} {:.3f}'.format(a, v) for a, v in mse.items()), chosen), flush=True)
    return {'chosen': chosen, 'validation_mse': mse, 'steps': steps}


def sinusoid_adaptation(checkpoint, row, step_size, tasks, steps, seed):
    """Mean MSE over `tasks` sinusoid tasks (drawn with `seed`) before and after each of `steps`
    gradient steps of `step_size`, from the weights of `checkpoint`: [steps + 1]. As in main.py's
    CSV, the first is measured on the support points (the reference's total_loss1), the others on
    the query points."""
    import tensorflow as tf
    import data_generator
    import experiment
    from maml import MAML, ModelConfig
    k = int(row.flag('update_batch_size'))
    inputs, outputs, _, _ = data_generator.SinusoidTasks(2 * k, tasks).generate(np.random.RandomState(seed))
    batch = data_generator.split_support_query(inputs, outputs, k)
    config = ModelConfig(datasource='sinusoid', norm=row.flag('norm', 'batch_norm'), meta_batch_size=tasks,
                         update_batch_size=k, update_lr=step_size, pretraining=False)
    with tf.Graph().as_default():
        model = MAML(config, 1, 1, test_num_updates=steps)
        model.construct_model(prefix='metaval_')
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            experiment.restore(sess, str(checkpoint), full_state=False)
            feed = {getattr(model, name): value.astype(np.float32) for name, value in batch.items()}
            return np.array(sess.run([model.metaval_total_loss1] + model.metaval_total_losses2, feed))


def run_evaluation(eval_flags, log_path):
    """main.py evaluating with eval_flags: (the checkpoint it restored, the CSV it wrote, seconds)."""
    code, lines, seconds, stopped = run_main(eval_flags, log_path)
    if stopped:
        raise KeyboardInterrupt
    if code != 0:
        raise RunnerError(main_error(lines))
    restored = [line.split('Restoring model weights from ', 1)[1] for line in lines
                if line.startswith('Restoring model weights from ')]
    written = [line[len('Wrote '):] for line in lines if line.startswith('Wrote ') and line.endswith('.csv')]
    if not restored or not written:
        raise RunnerError('main.py did not report the checkpoint it evaluated or the CSV it wrote; see {}'.format(
            log_path))
    return restored[-1], written[-1], seconds


## The saved checkpoints on the validation split (--validate_checkpoints)
def evaluate_checkpoint(flags, checkpoint, scratch, test_set, log_path):
    """The CSV columns of main.py evaluating one checkpoint (600 tasks of the validation or test
    split). It runs in `scratch`, a folder holding hard links to that checkpoint alone: the training
    run's folder and its CSV are left alone, and a training run still going may delete the
    checkpoint meanwhile."""
    checkpoint = Path(checkpoint)
    experiment = Path(scratch) / checkpoint.parent.name
    shutil.rmtree(scratch, ignore_errors=True)
    experiment.mkdir(parents=True)
    try:
        for part in checkpoint.parent.glob(checkpoint.name + '.*'):
            try:
                os.link(part, experiment / part.name)
            except OSError:
                shutil.copy(part, experiment / part.name)
        eval_flags = with_flag(flags, 'logdir', scratch) + ['--train=False', '--test_set=%s' % test_set]
        return read_csv(run_evaluation(eval_flags, log_path)[1])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def better(row, a, b):
    """Whether numbers a beat numbers b: accuracy after the last step the paper reports."""
    step = str(row.steps[-1])
    return a['steps'][step][0] > b['steps'][step][0]


def validate_checkpoints(row, flags, folder, state, state_path, last_checkpoint, last_numbers):
    """Evaluates every kept checkpoint not yet evaluated on 600 tasks of the validation split, then
    the one that did best there on the 600 test tasks. Not the paper's protocol (it reports the last
    checkpoint, as the row does); it shows where in the run the model was best."""
    if row.table == 'sinusoid':
        raise RunnerError('{}: sinusoid tasks have no validation split (its evaluation draws the same '
                          'tasks either way); --validate_checkpoints is for the image rows'.format(row.name))
    kept = kept_checkpoints(folder)
    log_path, scratch = folder / 'validate_checkpoints.log', folder.parent / ('.checkpoint_eval-' + row.name)
    for checkpoint in kept:
        number = str(checkpoint_iteration(checkpoint))
        if number in state.validation:
            continue
        print('== {}: {} on the validation tasks'.format(row.name, display_path(checkpoint)), flush=True)
        columns = evaluate_checkpoint(flags, checkpoint, scratch, False, log_path)
        state.validation[number] = reported_numbers(row, columns)
        state.save(state_path)
    # the best among those still on disk (or already evaluated on the test tasks); ties: the earlier
    on_disk = {str(checkpoint_iteration(p)): p for p in kept}
    tested = state.best_test['checkpoint'] if state.best_test else None
    candidates = sorted((n for n in state.validation if n in on_disk or n == tested), key=int)
    if not candidates:
        return None
    best = candidates[0]
    for number in candidates[1:]:
        if better(row, state.validation[number], state.validation[best]):
            best = number
    last = last_checkpoint.rsplit('model', 1)[1]
    if best == last:
        state.best_test = {'checkpoint': best, **last_numbers}
    elif best != tested:
        print('== {}: model{} (best on validation) on the test tasks'.format(row.name, best), flush=True)
        state.best_test = {'checkpoint': best, **reported_numbers(row, evaluate_checkpoint(
            flags, on_disk[best], scratch, True, log_path))}
    state.save(state_path)


## Cross-check: the same checkpoint evaluated by the reference's own code
# The reference's main.py, unchanged, run with os.listdir sorted: its Omniglot split then equals the
# port's (the reference's own split follows the file system's listing order, its known defect 3).
SORTED_LISTDIR_MAIN = """import os, runpy, sys
_listdir = os.listdir
os.listdir = lambda path='.': sorted(_listdir(path))
sys.argv = ['main.py'] + sys.argv[1:]
runpy.run_path('main.py', run_name='__main__')
"""


def reference_tools():
    """bench/reference.py: where the reference's code and venv are, and how to run a copy."""
    if str(REPO / 'bench') not in sys.path:
        sys.path.insert(0, str(REPO / 'bench'))
    import reference
    return reference


def reference_evaluate(row, data_root, checkpoint, log_path):
    """Evaluates `checkpoint` (600 test tasks) with the reference's code as shipped, batch norm from
    moments (the paper's math, as the port computes it), in a temporary copy that
    links the data and the checkpoint. Returns (CSV columns, seconds)."""
    tools = reference_tools()
    missing = tools.problem()
    if missing:
        raise RunnerError('--reference_eval: ' + missing)
    python = tools.python()
    checkpoint = REPO / checkpoint       # main.py prints it as given: absolute, or relative to the repository
    work = tools.working_copy(moments=True, data_root=data_root)
    try:
        experiment = work / 'logs' / checkpoint.parent.name     # the reference names it as the port does
        experiment.mkdir(parents=True)
        for part in checkpoint.parent.glob(checkpoint.name + '.*'):
            (experiment / part.name).symlink_to(part)
        (experiment / 'checkpoint').write_text('model_checkpoint_path: "{}"\n'.format(checkpoint.name))
        (work / 'sorted_listdir_main.py').write_text(SORTED_LISTDIR_MAIN)
        command = [str(python), '-u', 'sorted_listdir_main.py'] + row.flags + [
            '--train=False', '--test_set=True', '--logdir=' + str(work / 'logs'),
            '--test_iter=' + checkpoint.name[len('model'):]]
        start = time.time()
        with open(log_path, 'a') as log:
            log.write('\n$ {}\n'.format(' '.join(command)))
            log.flush()
            code = subprocess.run(command, cwd=work, stdout=log, stderr=subprocess.STDOUT,
                                  env=tools.env(TF_CPP_MIN_LOG_LEVEL='3')).returncode
        output = Path(log_path).read_text().rsplit('\n$ ', 1)[-1]
        if code != 0:
            raise RunnerError('the reference\'s evaluation failed (exit {}); see {}'.format(code, log_path))
        if 'Restoring model weights from' not in output:   # it would evaluate its random initialisation
            raise RunnerError('the reference did not load {}; see {}'.format(checkpoint, log_path))
        written = sorted(experiment.glob('test_ubs*.csv'))
        if len(written) != 1:
            raise RunnerError('the reference wrote no evaluation CSV; see {}'.format(log_path))
        return read_csv(written[0]), time.time() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)


def cross_check(row, data_root, checkpoint, ours, folder):
    """The record of one cross-check: the port's and the reference's numbers for one checkpoint."""
    print('== {}: the reference evaluates {}'.format(row.name, display_path(checkpoint)), flush=True)
    theirs, seconds = reference_evaluate(row, data_root, checkpoint, folder / 'reference_eval.log')
    return {'iterations': checkpoint_iteration(checkpoint) + 1,
            'port': reported_numbers(row, ours), 'reference': reported_numbers(row, theirs), 'seconds': round(seconds),
            'date': datetime.date.today().isoformat()}


def reported_numbers(row, columns):
    """From a CSV's columns: (mean, ci95) after each step the paper reports, and before adapting."""
    return {'steps': {str(s): columns['update%d' % s][::2] for s in row.steps},
            'pre_update': columns['update0'][::2]}


def kept_checkpoints(folder):
    """The model{N} in the row's experiment folder (not those main.py moved aside into its subfolders)."""
    found = []
    for index in folder.glob('*/model*.index'):
        try:
            found.append((checkpoint_iteration(index.with_suffix('')), index.with_suffix('')))
        except UserError:   # not model<N>
            continue
    return [path for _, path in sorted(found)]


def newest_checkpoint(folder):
    """model{N} with the largest N in the row's experiment folder."""
    found = kept_checkpoints(folder)
    return str(found[-1]) if found else None


def display_path(path):
    """Relative to the repository where it lies inside it, absolute otherwise."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def read_csv(path):
    with open(path) as f:
        rows = [line.strip().split(',') for line in f if line.strip()]
    header = rows[0]
    means, stds, ci95 = ([float(v) for v in r] for r in rows[1:4])
    return {name: (m, s, c) for name, m, s, c in zip(header, means, stds, ci95)}


def prepare_omniglot_from_zips(dest):
    """Prepares Omniglot into dest from the official zips in $MAML_OMNIGLOT_ZIPS, where it is set."""
    sys.path.insert(0, str(REPO / 'data'))
    import prepare_omniglot
    zips = os.environ.get(prepare_omniglot.ZIPS_ENV)
    if zips:
        try:
            survey, was_ready = prepare_omniglot.prepare(dest, source_dir=Path(zips))
            print(prepare_omniglot.summary_line(survey, dest, was_ready), flush=True)
        except prepare_omniglot.PrepareError as error:
            raise RunnerError('{}={}: {}'.format(prepare_omniglot.ZIPS_ENV, zips, error))


def run_row(row, iterations, logdir, data_root, results, train=True, reference_eval=False, validate=False):
    """Trains (or resumes) and evaluates one row, then records it in `results`. Without `train`,
    evaluates the run as far as it got; with `reference_eval`, the reference evaluates the same
    checkpoint too (an earlier cross-check is kept: it names its checkpoint); with `validate`, every
    kept checkpoint is evaluated on the validation tasks and the best of them on the test tasks."""
    folder = Path(logdir) / row.name
    if row.data:
        subfolder, hint = PREPARED_FOLDER[row.data], PREPARE_HINT[row.data]
        if row.data == 'omniglot' and not (Path(data_root) / subfolder).is_dir():
            prepare_omniglot_from_zips(Path(data_root) / subfolder)
        if not (Path(data_root) / subfolder).is_dir():
            if results.get(row.name, {}).get('status') != 'done':
                results[row.name] = {'status': 'needs data', 'prepare': hint}
            raise RunnerError('{}: no {} in {}; prepare it with: {} (or pass --data_root)'.format(
                row.name, subfolder, data_root, hint))
    folder.mkdir(parents=True, exist_ok=True)
    state_path = folder / 'runner.json'
    state = RunState.load(state_path)
    flags = row.command(iterations) + ['--logdir=' + str(folder), '--data_root=' + str(data_root),
                                       '--keep_checkpoint_every=%d' % KEEP_CHECKPOINT_EVERY]
    print('== {}: python main.py {}'.format(row.name, ' '.join(flags)), flush=True)
    if train:
        train_row(row, flags, folder, state, state_path)
    elif newest_checkpoint(folder) is None:
        raise RunnerError('{}: nothing trained yet in {}; run it without --no_train first'.format(row.name, folder))
    csv_path, checkpoint = evaluate_row(row, flags, folder, state, state_path)
    columns = read_csv(csv_path)
    trained = checkpoint_iteration(checkpoint) + 1
    checked = results.get(row.name, {}).get('reference_eval')
    results[row.name] = {
        'status': 'done',
        **reported_numbers(row, columns),
        'iterations': trained,
        'paper_iterations': row.paper_iterations,
        'train_seconds': round(state.train_seconds),
        'eval_seconds': round(state.eval_seconds),
        'machine': machine(),
        'date': datetime.date.today().isoformat(),
        'commits': state.commits + ([git_commit()] if git_commit() not in state.commits else []),
        'command': 'python main.py ' + ' '.join(row.command()),
        'csv': display_path(csv_path),
        'checkpoint': display_path(checkpoint),
        'all_steps': {name[len('update'):]: [mean, ci] for name, (mean, _, ci) in columns.items()},
        'curve': {int(k): v for k, v in state.curve.items() if int(k) < trained},
    }
    if state.evaluated.get('step_size'):
        results[row.name]['step_size'] = state.evaluated['step_size']
    if validate:   # after the row is recorded, as the cross-check: a failure does not lose it
        validate_checkpoints(row, flags, folder, state, state_path, checkpoint, reported_numbers(row, columns))
    if state.validation:
        results[row.name]['checkpoints'] = {'validation': state.validation, 'best': state.best_test,
                                            'last': checkpoint.rsplit('model', 1)[1]}
    if reference_eval:   # after the row is recorded: a failed cross-check does not lose it
        checked = cross_check(row, data_root, checkpoint, columns, folder)
    if checked:
        results[row.name]['reference_eval'] = checked


## RESULTS.md
DATA_BEGIN, DATA_END = '<!-- reproduce.py data: do not edit; rewritten from runs', '-->'


def load_results(path):
    if not path.is_file():
        return {}
    text = path.read_text()
    if DATA_BEGIN not in text:
        return {}
    block = text.split(DATA_BEGIN, 1)[1].split(DATA_END, 1)[0]
    return json.loads(block)


def fmt_value(table, mean, ci):
    if table == 'sinusoid':
        return '{:.3f}'.format(mean) + (' ± {:.3f}'.format(ci) if ci is not None else '')
    return '{:.2f}'.format(100 * mean) + (' ± {:.2f}'.format(100 * ci) if ci is not None else '')


def verdict(row, result):
    """How our number stands against the paper's, said plainly (only for a full-length run)."""
    if result['iterations'] < result['paper_iterations']:
        return 'short run: not comparable yet'
    if not row.paper:
        return 'no paper number'
    words = []
    for step, paper in zip(row.steps, row.paper):
        if paper is None:
            continue
        (mean, ci), (p_mean, p_ci) = result['steps'][str(step)], paper
        where = '{} step{}: '.format(step, '' if step == 1 else 's')
        if p_ci is None:    # a value without an interval (a table's, or read off a curve)
            inside = mean - ci <= p_mean <= mean + ci
            words.append(where + 'ours is {}{}'.format('lower' if mean < p_mean else 'higher',
                                                       ' (the paper\'s value lies inside our interval)' if inside else ''))
        elif mean + ci < p_mean - p_ci:
            words.append(where + 'ours is below the paper\'s interval')
        elif mean - ci > p_mean + p_ci:
            words.append(where + 'ours is above the paper\'s interval')
        else:
            words.append(where + 'our interval overlaps the paper\'s')
    return '<br>'.join(words)


def render_summary(results):
    """The four-column summary that opens RESULTS.md: each row's number, the paper's, the verdict."""
    lines = ['| row | ours (mean ± 95% CI) | paper | verdict |', '|---|---|---|---|']
    for row in ROWS.values():
        result = results.get(row.name)
        if not result or result.get('status') != 'done':
            continue
        ours = '<br>'.join('{}{}'.format('{} step{}: '.format(s, '' if s == 1 else 's') if len(row.steps) > 1 else '',
                                         fmt_value(row.table, *result['steps'][str(s)])) for s in row.steps)
        paper = '<br>'.join(fmt_value(row.table, *p) if p else '—' for p in row.paper) if row.paper else '—'
        if result['iterations'] < result['paper_iterations']:
            ours += ' (SHORT: {} of {} iterations)'.format(result['iterations'], result['paper_iterations'])
        lines.append('| `{}` {} | {} | {} | {} |'.format(row.name, row.label, ours, paper, verdict(row, result)))
    return lines


def render_table(table, results):
    rows = [r for r in ROWS.values() if r.table == table]
    unit = 'MSE' if table == 'sinusoid' else 'accuracy %'
    head = ('| row | ours ({}, mean ± 95% CI) | paper | before adapting | iterations / paper\'s | budget '
            '| vs paper | wall time (train + eval) | machine | date | commit |'.format(unit))
    lines = [head, '|' + '---|' * 11]
    for row in rows:
        result = results.get(row.name)
        if not result or result.get('status') != 'done':
            why = 'not run here'
            if result and result.get('status') == 'needs data':
                why = 'not run: needs data, `{}`'.format(result['prepare'])
            lines.append('| `{}` {} | {} | | | | | | | | | |'.format(row.name, row.label, why))
            continue
        ours = '<br>'.join('{} step{}: {}'.format(s, '' if s == 1 else 's', fmt_value(table, *result['steps'][str(s)]))
                           for s in row.steps)
        paper = '<br>'.join(fmt_value(table, *p) if p else '—' for p in row.paper) if row.paper else '—'
        short = result['iterations'] < result['paper_iterations']
        lines.append('| `{}` {} | {} | {} | {} | {} / {} | {} | {} | {} + {} | {} | {} | {} |'.format(
            row.name, row.label, ours, paper, fmt_value(table, *result['pre_update']),
            result['iterations'], result['paper_iterations'],
            'SHORT: {} of {}'.format(result['iterations'], result['paper_iterations']) if short else 'full',
            verdict(row, result), format_seconds(int(result['train_seconds'])),
            format_seconds(int(result['eval_seconds'])), result['machine'], result['date'],
            ', '.join(result['commits'])))
    return lines


def render_curves(results):
    lines = []
    for row in ROWS.values():
        result = results.get(row.name)
        if not result or result.get('status') != 'done' or not result.get('curve'):
            continue
        curve = sorted((int(k), v) for k, v in result['curve'].items())
        steps = int(row.flag('num_updates', '1'))
        lines += ['', '<details><summary><code>{}</code>: validation accuracy every 500 iterations '
                      '(one meta-batch of validation tasks, as main.py prints it)</summary>'.format(row.name), '',
                  '| iteration | before adapting | after {} step{} |'.format(steps, '' if steps == 1 else 's'),
                  '|---|---|---|']
        lines += ['| {} | {:.3f} | {:.3f} |'.format(itr, pre, post) for itr, (pre, post) in curve]
        lines += ['', '</details>']
    return lines


def render_checkpoint_sweeps(results):
    swept = [(row, results[row.name]) for row in ROWS.values() if results.get(row.name, {}).get('checkpoints')]
    if not swept:
        return []
    lines = ['## The saved checkpoints on the validation split', '',
             'Written by `python reproduce.py ROW --validate_checkpoints`: every checkpoint the run kept (the '
             'newest 10 and one every {} iterations) evaluated on 600 tasks of the validation split '
             '(`--train=False --test_set=False`, the same tasks for each), and the one that did best there '
             'evaluated on the 600 test tasks. This is not the paper\'s protocol: the rows above evaluate the '
             'last checkpoint, as the reference does. It shows where in the run the model was best, and what '
             'stopping there would have given.'.format(KEEP_CHECKPOINT_EVERY), '',
             '| row | last checkpoint: test (the row) | best on validation | its validation | its test |',
             '|---|---|---|---|---|']
    details = []
    for row, result in swept:
        sweep = result['checkpoints']
        numbers = lambda entry: '<br>'.join('{} step{}: {}'.format(s, '' if s == 1 else 's', fmt_value(
            row.table, *entry['steps'][str(s)])) for s in row.steps)
        best = sweep.get('best')
        lines.append('| `{}` | model{}: {} | {} | {} | {} |'.format(
            row.name, sweep['last'], numbers(result),
            'model' + best['checkpoint'] if best else '—',
            numbers(sweep['validation'][best['checkpoint']]) if best else '—',
            numbers(best) if best else '—'))
        details += ['', '<details><summary><code>{}</code>: each kept checkpoint on the validation tasks'
                        '</summary>'.format(row.name), '',
                    '| checkpoint | before adapting | {} |'.format(' | '.join(
                        'after {} step{}'.format(s, '' if s == 1 else 's') for s in row.steps)),
                    '|---|---|' + '---|' * len(row.steps)]
        for number, entry in sorted(sweep['validation'].items(), key=lambda item: int(item[0])):
            mark = ' (best)' if best and number == best['checkpoint'] else ''
            mark += ' (last)' if number == sweep['last'] else ''
            details.append('| model{}{} | {} | {} |'.format(number, mark, fmt_value(row.table, *entry['pre_update']),
                                                        ' | '.join(fmt_value(row.table, *entry['steps'][str(s)])
                                                                   for s in row.steps)))
        details += ['', '</details>']
    return lines + details + ['']


def render_cross_checks(results):
    checked = [(row, results[row.name]['reference_eval']) for row in ROWS.values()
               if results.get(row.name, {}).get('reference_eval')]
    if not checked:
        return []
    lines = ['## Cross-check: the same checkpoints evaluated by the reference\'s own code', '',
             'Written by `python reproduce.py ROW --reference_eval`: the checkpoint the row was evaluated '
             'from, evaluated again by the reference\'s code (TF 1.15, batch norm from moments, its listing '
             'of the Omniglot folders sorted so that its split is the port\'s). Sinusoid test tasks are the '
             'same on both sides (numpy seeded with 1); the reference draws its own image tasks (Python\'s '
             'random at graph construction, rotations unseeded), so image rows agree only within sampling '
             'noise.', '',
             '| row | checkpoint (iterations) | this port | the reference | before adapting: port, reference | date |',
             '|---|---|---|---|---|---|']
    for row, check in checked:
        side = lambda which: '<br>'.join('{} step{}: {}'.format(s, '' if s == 1 else 's', fmt_value(
            row.table, *check[which]['steps'][str(s)])) for s in row.steps)
        lines.append('| `{}` | {} | {} | {} | {}, {} | {} |'.format(
            row.name, check['iterations'], side('port'), side('reference'),
            fmt_value(row.table, *check['port']['pre_update']), fmt_value(row.table, *check['reference']['pre_update']),
            check['date']))
    return lines + ['']


FIGURES = 'figures'   # beside RESULTS.md: the PNGs `--figures` writes, which RESULTS.md embeds
FIGURE_FILES = {'sinusoid': ['figure2_sinusoid_k5.png', 'figure3_sinusoid_k5.png', 'figure2_sinusoid_k10.png',
                             'figure3_sinusoid_k10.png'],
                'omniglot': ['omniglot_5w1s_batch_norm_meta_gradients.png'] + [
                    '{}_validation.png'.format(name) for name in ROWS if name.startswith('omniglot')]}


def render_figures(table, folder):
    """Markdown embedding the figures of `table` that exist in `folder` (relative to RESULTS.md)."""
    if folder is None:
        return []
    present = [name for name in FIGURE_FILES.get(table, []) if (Path(folder) / FIGURES / name).is_file()]
    return ['![{}]({}/{})'.format(name[:-len('.png')].replace('_', ' '), FIGURES, name) for name in present]


def render(results, folder=None):
    lines = ['# Results: the MAML paper\'s tables, reproduced with this port', '',
             'Every number here was written by `python reproduce.py ROW` from the evaluation CSV of a '
             'run (600 test tasks, `--train=False --test_set=True`); the commands and how each number '
             'is taken are in `reproduce.py --list` and the README. A row trained for fewer iterations '
             'than the paper says so in its budget column and is not compared with the paper. Wall '
             'times are this machine\'s (CPU only). Image rows train with the meta-gradient through batch '
             'norm that the paper\'s TensorFlow (1.1/1.2) computed, the port\'s default, except the row '
             'labelled TF >= 1.3 (`--moments_stop_gradient=True`: what the reference computes on TF 1.15 '
             'and the golden cases pin; see the README).', '']
    titles = {'sinusoid': 'Sinusoid regression (MSE after 1, 5 and 10 inner steps; the paper\'s K=5 values are '
                          'its Table 2 in Appendix C.1, its K=10 value is read off its Figure 3)',
              'omniglot': 'Omniglot (Table 1)', 'miniimagenet': 'MiniImagenet (Table 1)'}
    lines += ['## Summary', '', 'Accuracy in % for the image rows, mean squared error for the sinusoid. The paper '
              'gives the sinusoid\'s numbers without an interval (K=5: its Table 2, Appendix C.1; K=10: read off '
              'its Figure 3): the verdict says which side ours is on. Where the paper has an interval, "overlaps" '
              'means the two 95% intervals share values.', ''] + render_summary(results) + ['', 'Each row\'s command, budget, wall time, '
              'machine and commits: the tables below.', '']
    for table in ('sinusoid', 'omniglot', 'miniimagenet'):
        lines += ['## ' + titles[table], ''] + render_table(table, results) + ['']
        figures_here = render_figures(table, folder)
        if figures_here:
            lines += ['Drawn by `python reproduce.py --figures` from these rows\' outputs:', ''] + \
                [line + '\n' for line in figures_here]
        tuned = [(row, results[row.name]['step_size']) for row in ROWS.values()
                 if row.table == table and results.get(row.name, {}).get('step_size')]
        for row, step in tuned:
            lines += ['`{}`: fine-tuning step size {} (mean MSE after {} steps on 600 validation tasks: {}).'.format(
                row.name, step['chosen'], step['steps'], ', '.join('{} {:.3f}'.format(a, v) for a, v in
                                                                   step['validation_mse'].items())), '']
    lines += render_cross_checks(results)
    lines += render_checkpoint_sweeps(results)
    curves = render_curves(results)
    if curves:
        lines += ['## Validation curves'] + curves + ['']
    lines += [DATA_BEGIN, json.dumps(results, indent=None, sort_keys=True), DATA_END, '']
    return '\n'.join(lines)


def write_results(path, results):
    partial = path.with_name(path.name + '.partial')
    partial.write_text(render(results, path.parent))
    os.replace(partial, path)


## Command line
def list_rows():
    for row in ROWS.values():
        print('{:<28s} {}  [{}]\n{:<28s} python main.py {}'.format(
            row.name, row.label, row.note, '', ' '.join(row.command())))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument('rows', nargs='*', help='row names or groups: ' + ', '.join(list(GROUPS)))
    parser.add_argument('--list', action='store_true', help='list the rows and their commands')
    parser.add_argument('--iterations', type=int, default=None,
                        help='train this many iterations instead of the paper\'s (labelled as a short run)')
    parser.add_argument('--no_train', action='store_true',
                        help='evaluate each row as far as it has trained (its row says how far), without training')
    parser.add_argument('--reference_eval', action='store_true',
                        help='also evaluate the same checkpoint with the reference\'s own code (TF 1.15 venv) '
                             'and record both')
    parser.add_argument('--validate_checkpoints', action='store_true',
                        help='also evaluate every kept checkpoint (the newest 10 and every %d iterations) on 600 '
                             'validation tasks, and the best of them on the test tasks: where in the run the model '
                             'was best (the row itself stays the paper\'s protocol, the last checkpoint)'
                             % KEEP_CHECKPOINT_EVERY)
    parser.add_argument('--figures', action='store_true',
                        help='draw the paper\'s figures from the rows run so far (PNGs in figures/ beside --results, '
                             'embedded in it); needs matplotlib: pip install -r requirements-figures.txt')
    parser.add_argument('--logdir', default=str(REPO / 'logs' / 'reproduce'))
    parser.add_argument('--data_root', default=str(REPO / 'data'))
    parser.add_argument('--results', default=str(REPO / 'RESULTS.md'))
    args = parser.parse_args(argv)
    if args.figures and not args.rows:
        return draw_figures(Path(args.results))
    if args.list or not args.rows:
        list_rows()
        return 0
    unknown = [r for r in args.rows if r not in ROWS and r not in GROUPS]
    if unknown:
        print('error: unknown row {}; see python reproduce.py --list'.format(unknown[0]), file=sys.stderr)
        return 2
    if args.iterations is not None and args.iterations <= 0:
        print('error: --iterations must be positive', file=sys.stderr)
        return 2
    names = [n for r in args.rows for n in (GROUPS.get(r) or [r])]
    results_path = Path(args.results)
    failed = False
    for name in dict.fromkeys(names):
        results = load_results(results_path)
        try:
            run_row(ROWS[name], args.iterations, args.logdir, args.data_root, results, train=not args.no_train,
                    reference_eval=args.reference_eval, validate=args.validate_checkpoints)
        except RunnerError as error:
            print('error: ' + str(error), file=sys.stderr, flush=True)
            failed = True
        except KeyboardInterrupt:
            print('{}: stopped; rerun the same command to resume.'.format(name), file=sys.stderr)
            return 130
        latest = load_results(results_path)   # another runner may have written other rows meanwhile
        if name in results:
            latest[name] = results[name]
        write_results(results_path, latest)
        if results.get(name, {}).get('status') == 'done':
            print('{}: wrote its row of {}'.format(name, results_path), flush=True)
    if args.figures:
        failed = draw_figures(results_path) or failed
    return 2 if failed else 0


def draw_figures(results_path):
    """`--figures`: every figure whose rows have run, into figures/ beside results_path, then
    results_path rewritten to embed them. Returns the exit code."""
    import figures
    try:
        written = figures.write_figures(load_results(results_path), ROWS, results_path.parent / FIGURES, REPO)
    except figures.FiguresError as error:
        print('error: ' + str(error), file=sys.stderr)
        return 2
    write_results(results_path, load_results(results_path))
    for _, path, caption in written:
        print('wrote {}: {}'.format(display_path(path), caption), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
