"""reproduce.py: a row written from a real run's CSV, resumed on a second run, and missing data."""
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import reproduce
from tests.conftest import REPO

ROW = 'sine_k5_maml'


def run_reproduce(*args, timeout=600, env=None):
    return subprocess.run([sys.executable, str(REPO / 'reproduce.py'), *args], cwd=str(REPO),
                          capture_output=True, text=True, timeout=timeout, env=env)


def table_line(results_md, row):
    """The row's line in its table (not in the four-column summary)."""
    lines = [line for line in results_md.splitlines() if line.startswith('| `{}`'.format(row)) and line.count('|') > 6]
    assert len(lines) == 1, results_md
    return [cell.strip() for cell in lines[0].strip('|').split('|')]


def read_csv(path):
    with open(path) as f:
        rows = list(csv.reader(f))
    return {name: [float(r[i]) for r in rows[1:]] for i, name in enumerate(rows[0])}


@pytest.fixture(scope='module')
def first_run(tmp_path_factory):
    base = tmp_path_factory.mktemp('reproduce')
    args = (ROW, '--iterations=60', '--logdir=' + str(base / 'logs'), '--results=' + str(base / 'RESULTS.md'))
    return base, args, run_reproduce(*args)


def test_tiny_budget_writes_its_row_from_the_csv(first_run):
    base, _, result = first_run
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    text = (base / 'RESULTS.md').read_text()
    data = reproduce.load_results(base / 'RESULTS.md')
    entry = data[ROW]
    csv_path = REPO / entry['csv']
    assert csv_path.is_file() and str(csv_path).startswith(str(base / 'logs' / ROW))
    columns = read_csv(csv_path)
    assert list(columns) == ['update%d' % i for i in range(11)]
    for step in (1, 5, 10):                       # mean and 95% CI of the CSV, as the row shows them
        mean, _, ci = columns['update%d' % step]
        assert entry['steps'][str(step)] == pytest.approx([mean, ci], rel=1e-6)
    assert entry['pre_update'] == pytest.approx([columns['update0'][0], columns['update0'][2]], rel=1e-6)
    # Every step's mean and CI (for the figures), and the checkpoint evaluated.
    assert sorted(entry['all_steps'], key=int) == [str(i) for i in range(11)]
    for i in range(11):
        assert entry['all_steps'][str(i)] == pytest.approx([columns['update%d' % i][0], columns['update%d' % i][2]],
                                                           rel=1e-6)
    assert entry['checkpoint'].endswith('model59') and (REPO / (entry['checkpoint'] + '.index')).is_file()
    assert entry['iterations'] == 60 and entry['paper_iterations'] == 70000
    cells = table_line(text, ROW)
    mean1, _, ci1 = columns['update1']
    assert '1 step: {:.3f} ± {:.3f}'.format(mean1, ci1) in cells[1]
    assert cells[2].startswith('0.670')                              # the paper's K=5 value after 1 step
    assert cells[4] == '60 / 70000' and cells[5] == 'SHORT: 60 of 70000'
    assert 'not comparable' in cells[6]
    assert entry['commits'] and entry['date'] in cells[9] and 'cores' in cells[8]
    assert entry['train_seconds'] > 0
    # Every other row is listed as not run, with no numbers.
    assert 'not run here' in ' '.join(table_line(text, 'omniglot_5w1s'))
    assert '--metatrain_iterations=60' in (base / 'logs' / ROW / 'train.log').read_text()


@pytest.mark.slow
def test_a_second_run_resumes_instead_of_starting_over(first_run):
    base, args, _ = first_run
    before = reproduce.load_results(base / 'RESULTS.md')[ROW]
    again = run_reproduce(*args)                   # same budget: nothing to train or evaluate
    assert again.returncode == 0, again.stderr[-2000:]
    assert 'Training already finished' in again.stdout
    assert 'Wrote ' not in again.stdout            # the evaluation of model59 is reused
    longer = run_reproduce(*[a for a in args if not a.startswith('--iterations')], '--iterations=90')
    assert longer.returncode == 0, longer.stderr[-2000:]
    exp = next((base / 'logs' / ROW).glob('cls_*'))
    assert 'Restoring model weights from {}'.format(exp / 'model59') in longer.stdout
    after = reproduce.load_results(base / 'RESULTS.md')[ROW]
    assert after['iterations'] == 90
    assert after['train_seconds'] >= before['train_seconds']
    assert after['steps'] != before['steps']
    state = json.loads((base / 'logs' / ROW / 'runner.json').read_text())
    assert state['evaluated']['checkpoint'].endswith('model89')

    # --no_train evaluates what is there (a run stopped part way) and writes its row as far as it got.
    for f in exp.glob('model89.*'):
        f.unlink()
    as_far = run_reproduce(*[a for a in args if not a.startswith('--iterations')], '--no_train')
    assert as_far.returncode == 0, as_far.stderr[-2000:]
    assert 'Training already' not in as_far.stdout and 'Restoring model weights from {}'.format(
        exp / 'model59') in as_far.stdout
    assert reproduce.load_results(base / 'RESULTS.md')[ROW]['iterations'] == 60


@pytest.mark.slow
def test_a_runner_killed_outright_keeps_its_wall_time(tmp_path):
    """kill -9 of the runner and its main.py (a closed session does that): the wall time and
    commits recorded at the progress lines so far survive, and the next run resumes from main.py's
    checkpoint and adds to them."""
    args = (ROW, '--iterations=200000', '--logdir=' + str(tmp_path / 'logs'),
            '--results=' + str(tmp_path / 'RESULTS.md'))
    runner = subprocess.Popen([sys.executable, str(REPO / 'reproduce.py'), *args], cwd=str(REPO),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    exp = tmp_path / 'logs' / ROW
    deadline = time.time() + 300
    try:
        while time.time() < deadline and runner.poll() is None:
            if len(list(exp.rglob('model*.index'))) >= 2:
                break
            time.sleep(0.2)
    finally:
        main_pids = subprocess.run(['pgrep', '-f', '--', '--logdir=' + str(exp)],
                                   capture_output=True, text=True).stdout.split()
        for pid in main_pids + [str(runner.pid)]:    # main.py runs in its own process group
            try:
                os.killpg(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        runner.wait()
    assert runner.returncode == -signal.SIGKILL
    state = json.loads((exp / 'runner.json').read_text())
    assert state['train_seconds'] > 0 and state['commits']
    assert (exp / 'train.log').read_text().count('Iteration ') >= 2      # the log is flushed too
    again = run_reproduce(ROW, '--iterations=6000', *args[2:])
    assert again.returncode == 0, again.stderr[-2000:]
    assert 'Restoring model weights from' in again.stdout
    entry = reproduce.load_results(tmp_path / 'RESULTS.md')[ROW]
    assert entry['train_seconds'] > round(state['train_seconds'])


def test_without_the_reference_the_cross_check_says_how_to_give_it(first_run, tmp_path, one_line_error):
    """No reference's code where MAML_REFERENCE_DIR points: one line naming the variable and the
    command that fetches it; the row is still written."""
    base, _, _ = first_run
    results = base / 'RESULTS_no_reference.md'
    env = dict(os.environ, MAML_REFERENCE_DIR=str(tmp_path / 'nothing'))
    result = run_reproduce(ROW, '--no_train', '--reference_eval', '--logdir=' + str(base / 'logs'),
                           '--results=' + str(results), env=env)
    assert result.returncode == 2
    one_line_error(result, '--reference_eval', 'MAML_REFERENCE_DIR', 'python bench/reference.py --fetch')
    assert reproduce.load_results(results)[ROW]['iterations'] == 60


def test_the_reference_evaluates_the_same_checkpoint_to_the_same_numbers(first_run, reference_code):
    """--reference_eval: the reference's own code (TF 1.15) evaluates the row's checkpoint. Sinusoid
    test tasks are the same on both sides (numpy seeded with 1), so its numbers must be ours."""
    base, _, _ = first_run
    results = base / 'RESULTS_cross_check.md'
    # TF2_BEHAVIOR=1, as in any process that imported TF 2, must not reach TF 1.15 (it runs eagerly).
    result = run_reproduce(ROW, '--no_train', '--reference_eval', '--logdir=' + str(base / 'logs'),
                           '--results=' + str(results), env=dict(os.environ, TF2_BEHAVIOR='1'))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    entry = reproduce.load_results(results)[ROW]
    check = entry['reference_eval']
    assert check['iterations'] == entry['iterations'] == 60
    assert check['port']['steps'] == entry['steps']
    for step in ('1', '5', '10'):
        assert check['reference']['steps'][step] == pytest.approx(check['port']['steps'][step], rel=1e-4)
    assert check['reference']['pre_update'] == pytest.approx(entry['pre_update'], rel=1e-4)
    # Adapting a 60-iteration model changes the loss: equal numbers are not equal constants.
    assert abs(check['reference']['steps']['10'][0] - check['reference']['pre_update'][0]) > 1e-3
    log = (base / 'logs' / ROW / 'reference_eval.log').read_text()
    assert 'sorted_listdir_main.py' in log and 'Restoring model weights from' in log and 'model59' in log
    # The recorded numbers are the ones the reference itself printed (its means, then stds, then CIs).
    printed = log.split('Mean validation accuracy/loss, stddev, and confidence intervals', 1)[1]
    means = [float(v) for v in printed.split('array([', 1)[1].split(']', 1)[0].replace(',', ' ').split()]
    assert len(means) == 11
    assert check['reference']['pre_update'][0] == pytest.approx(means[0], rel=1e-6)
    assert check['reference']['steps']['10'][0] == pytest.approx(means[10], rel=1e-6)
    assert '| `{}` | 60 |'.format(ROW) in results.read_text()


def test_a_row_without_its_data_names_the_preparation_command(tmp_path):
    results = tmp_path / 'RESULTS.md'
    without_zips = {k: v for k, v in os.environ.items() if k != 'MAML_OMNIGLOT_ZIPS'}   # else it prepares them
    result = run_reproduce('omniglot_5w1s', 'mini_5w1s', '--data_root=' + str(tmp_path / 'nothing'),
                           '--logdir=' + str(tmp_path / 'logs'), '--results=' + str(results), env=without_zips)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 2 and 'Traceback' not in result.stderr, result.stderr
    assert 'python data/prepare_omniglot.py' in errors[0] and 'python data/prepare_miniimagenet.py' in errors[1]
    text = results.read_text()
    assert 'needs data, `python data/prepare_omniglot.py' in ' '.join(table_line(text, 'omniglot_5w1s'))
    assert 'needs data, `python data/prepare_miniimagenet.py' in ' '.join(table_line(text, 'mini_5w1s'))
    assert not (tmp_path / 'logs' / 'omniglot_5w1s').exists()


def test_rows_are_the_usage_blocks_commands():
    usage = (REPO / 'main.py').read_text().split('"""')[1]
    commands = [[f for f in line.strip()[len('python main.py '):].split() if not f.startswith('--logdir')]
                for line in usage.splitlines() if line.strip().startswith('python main.py')]
    sine, oracle, pretrained, omniglot5, omniglot20, mini1, mini5 = commands
    expected = {
        'sine_k10_maml_usage': sine, 'sine_k10_oracle': oracle, 'sine_k10_pretrained': pretrained,
        'sine_k10_pretrained_tuned': pretrained,
        'sine_k5_pretrained_tuned': reproduce.with_flag(pretrained, 'update_batch_size', 5),
        'sine_k10_maml': sine + ['--update_lr=0.01'],
        'sine_k5_maml': reproduce.with_flag(sine, 'update_batch_size', 5) + ['--update_lr=0.01'],
        'sine_k5_pretrained': reproduce.with_flag(pretrained, 'update_batch_size', 5),
        'sine_k5_maml_usage': reproduce.with_flag(sine, 'update_batch_size', 5),
        'sine_k5_oracle': reproduce.with_flag(oracle, 'update_batch_size', 5),
        'omniglot_5w1s': omniglot5, 'omniglot_20w1s': omniglot20,
        'omniglot_5w5s': reproduce.with_flag(omniglot5, 'update_batch_size', 5),
        'omniglot_20w5s': reproduce.with_flag(omniglot20, 'update_batch_size', 5),
        'mini_5w1s': mini1, 'mini_5w5s': mini5, 'mini_5w1s_first_order': mini1 + ['--stop_grad=True'],
        'mini_5w5s_first_order': mini5 + ['--stop_grad=True'],
        'omniglot_5w1s_tf13_moments': omniglot5 + ['--moments_stop_gradient=True'],
    }
    assert set(expected) == set(reproduce.ROWS)
    for name, flags in expected.items():
        assert sorted(reproduce.ROWS[name].flags) == sorted(flags), name
    steps = {name: row.steps for name, row in reproduce.ROWS.items()}
    assert steps['omniglot_5w1s'] == steps['omniglot_5w5s'] == (3,)
    assert steps['omniglot_20w1s'] == steps['omniglot_20w5s'] == (5,)
    assert steps['mini_5w1s'] == steps['mini_5w5s_first_order'] == (10,)
    assert steps['sine_k10_maml'] == (1, 5, 10)
    np.testing.assert_allclose(reproduce.ROWS['omniglot_5w1s'].paper[0], (0.987, 0.004))
    np.testing.assert_allclose(reproduce.ROWS['mini_5w5s_first_order'].paper[0], (0.6315, 0.0091))


def printed_evaluations(log_text):
    """{(test_set, checkpoint N): the means main.py printed} for each main.py run in a runner's log."""
    found = {}
    for block in log_text.split('\n$ ')[1:]:
        test_set = '--test_set=True' in block.splitlines()[0]
        number = re.search(r'Restoring model weights from \S*model(\d+)\n', block).group(1)
        printed = block.split('Mean validation accuracy/loss, stddev, and confidence intervals', 1)[1]
        found[test_set, number] = [float(v) for v in printed.split('array([', 1)[1].split(']', 1)[0]
                                   .replace(',', ' ').split()]
    return found


@pytest.mark.slow
def test_validate_checkpoints_evaluates_each_kept_checkpoint_and_the_best_on_the_test_tasks(omniglot_standin_root,
                                                                                            tmp_path):
    """--validate_checkpoints on an Omniglot run (the stand-in) with two checkpoints (model2, then model4 on
    resuming): each one's validation numbers are those main.py printed evaluating it on the
    validation split, the best one's test numbers its evaluation on the test split, the row (the
    last checkpoint on the test tasks) is untouched, and a rerun evaluates nothing again."""
    row = reproduce.ROWS['omniglot_5w1s']
    logs, results = tmp_path / 'logs', tmp_path / 'RESULTS.md'
    common = ('--logdir=' + str(logs), '--data_root=' + str(omniglot_standin_root), '--results=' + str(results))
    # model2 by main.py itself in the row's folder (as the runner would train it), then the runner
    # resumes to model4, evaluates the row and validates both.
    first = subprocess.run([sys.executable, str(REPO / 'main.py')] + row.command(3) + [
        '--logdir=' + str(logs / row.name), '--data_root=' + str(omniglot_standin_root)],
        cwd=str(REPO), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    second = run_reproduce(row.name, '--iterations=5', '--validate_checkpoints', *common)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    entry = reproduce.load_results(results)[row.name]
    assert '--keep_checkpoint_every=5000' in (logs / row.name / 'train.log').read_text()
    sweep = entry['checkpoints']
    assert sweep['last'] == '4' and sorted(sweep['validation']) == ['2', '4']

    # What main.py itself printed for each evaluation the runner ran (the runner reads its CSV).
    sweep_log = (logs / row.name / 'validate_checkpoints.log').read_text()
    printed = printed_evaluations(sweep_log)
    for number in ('2', '4'):
        means = printed[False, number]          # --test_set=False: the validation tasks
        assert sweep['validation'][number]['steps']['3'][0] == pytest.approx(means[3])
        assert sweep['validation'][number]['pre_update'][0] == pytest.approx(means[0])
    best = max(('2', '4'), key=lambda n: (sweep['validation'][n]['steps']['3'][0], -int(n)))
    assert sweep['best']['checkpoint'] == best
    if best == '4':     # the last checkpoint: its test numbers are the row's
        assert sweep['best']['steps'] == entry['steps'] and set(printed) == {(False, '2'), (False, '4')}
    else:
        assert set(printed) == {(False, '2'), (False, '4'), (True, '2')}
        assert sweep['best']['steps']['3'][0] == pytest.approx(printed[True, '2'][3])
    # The row is still the last checkpoint on the test tasks, from the CSV of its own evaluation.
    test_csv = reproduce.read_csv(REPO / entry['csv'])
    assert entry['steps']['3'] == pytest.approx(list(test_csv['update3'][::2]))
    assert not list(logs.glob('.checkpoint_eval-*'))                 # the scratch folder is gone

    text = results.read_text()
    assert '## The saved checkpoints on the validation split' in text
    assert '| model2' in text and '| model4' in text
    log = logs / row.name / 'validate_checkpoints.log'
    evaluated = log.read_text().count('\n$ ')
    again = run_reproduce(row.name, '--no_train', '--validate_checkpoints', *common)
    assert again.returncode == 0, again.stderr[-2000:]
    assert log.read_text().count('\n$ ') == evaluated                # nothing evaluated twice
    assert reproduce.load_results(results)[row.name]['checkpoints'] == sweep


def test_validate_checkpoints_refuses_sinusoid_rows_in_one_line(first_run):
    base, _, _ = first_run
    result = run_reproduce(ROW, '--no_train', '--validate_checkpoints', '--logdir=' + str(base / 'logs'),
                           '--results=' + str(base / 'RESULTS_validate.md'))
    assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr
    assert 'no validation split' in result.stderr.splitlines()[-1]
    assert reproduce.load_results(base / 'RESULTS_validate.md')[ROW]['iterations'] == 60   # the row is kept


def test_omniglot_rows_prepare_their_data_from_the_zips_variable(tmp_path, one_line_error):
    """Without data/omniglot_resized an Omniglot row prepares it from $MAML_OMNIGLOT_ZIPS; zips that
    are not the official set are named, with what they hold."""
    from tests.conftest import OMNIGLOT_SUBSET_ZIPS
    env = dict(os.environ, MAML_OMNIGLOT_ZIPS=str(OMNIGLOT_SUBSET_ZIPS))
    result = run_reproduce('omniglot_5w1s', '--data_root=' + str(tmp_path / 'data'), '--logdir=' + str(tmp_path / 'logs'),
                           '--results=' + str(tmp_path / 'RESULTS.md'), env=env)
    assert result.returncode == 2
    one_line_error(result, 'MAML_OMNIGLOT_ZIPS=' + str(OMNIGLOT_SUBSET_ZIPS), 'not the Omniglot set',
                   'found 3 alphabets, 54 characters')
    assert not (tmp_path / 'data' / 'omniglot_resized').exists()


def test_results_open_with_a_four_column_summary_whose_verdicts_say_what_they_mean():
    row = reproduce.ROWS['omniglot_5w1s']           # the paper: 98.7 ± 0.4
    sine = reproduce.ROWS['sine_k5_maml']           # read off the paper's curve: 0.67, 0.38, 0.35
    done = dict(status='done', iterations=60000, paper_iterations=60000, pre_update=[0.2, 0.01], train_seconds=60,
                eval_seconds=9, machine='a machine', date='2026-12-07', commits=['abc1234'])
    results = {row.name: dict(done, steps={'3': [0.993, 0.0033]}),
               sine.name: dict(done, iterations=70000, paper_iterations=70000,
                               steps={'1': [0.605, 0.063], '5': [0.3, 0.1], '10': [0.2, 0.01]})}
    assert reproduce.verdict(row, results[row.name]) == '3 steps: our interval overlaps the paper\'s'
    assert reproduce.verdict(row, dict(results[row.name], steps={'3': [0.90, 0.01]})) == \
        '3 steps: ours is below the paper\'s interval'
    assert reproduce.verdict(row, dict(results[row.name], steps={'3': [0.999, 0.0001]})) == \
        '3 steps: ours is above the paper\'s interval'
    assert reproduce.verdict(sine, results[sine.name]).split('<br>') == [
        '1 step: ours is lower',
        '5 steps: ours is lower (the paper\'s value lies inside our interval)',
        '10 steps: ours is lower']
    summary = reproduce.render_summary(results)
    assert summary[0] == '| row | ours (mean ± 95% CI) | paper | verdict |'
    cells = [[c.strip() for c in line.strip('|').split('|')] for line in summary[2:]]
    assert [len(c) for c in cells] == [4, 4]
    assert cells[1] == ['`omniglot_5w1s` Omniglot 5-way 1-shot', '99.30 ± 0.33', '98.70 ± 0.40',
                        '3 steps: our interval overlaps the paper\'s']
    text = reproduce.render(results)
    assert text.index('## Summary') < text.index('## Sinusoid regression') < text.index('## Omniglot')
