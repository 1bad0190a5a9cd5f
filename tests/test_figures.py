"""reproduce.py --figures (figures.py): the data each figure plots, against its sources; the PNGs.

The arrays are checked in the fast suite; drawing needs matplotlib (requirements-figures.txt), which the
full suite has (CI installs it), as it has TensorBoard for the live curves."""
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import figures
import reproduce
from tests.conftest import GOLDEN, REPO

tf1 = tf.compat.v1
TRAINED = GOLDEN / 'sinusoid_trained' / 'cls_5.mbs_25.ubs_10.numstep1.updatelr0.01nonorm' / 'model4999'
EXPECTED_CSV = GOLDEN / 'sinusoid_trained' / 'expected' / 'test_ubs10_stepsize0.01.csv'


def checkpoint_weights():
    reader = tf1.train.load_checkpoint(str(TRAINED))
    return [reader.get_tensor('model/' + name).astype(np.float64)
            for name in ('Variable', 'Variable_1', 'Variable_2', 'Variable_3', 'Variable_4', 'Variable_5')]


def numpy_fit(weights, support_x, support_y, step_size, steps, grid):
    """The sinusoid network (40-40 ReLU) in numpy, fine-tuned by plain gradient descent on the MSE of the
    support points (backpropagation by hand): {step: predictions on grid}."""
    def forward(w, x):
        w1, b1, w2, b2, w3, b3 = w
        h1 = np.maximum(x @ w1 + b1, 0)
        h2 = np.maximum(h1 @ w2 + b2, 0)
        return h1, h2, h2 @ w3 + b3

    w = [v.copy() for v in weights]
    x, y = support_x.reshape(-1, 1), support_y.reshape(-1, 1)
    predictions = {0: forward(w, grid.reshape(-1, 1))[2].reshape(-1)}
    for step in range(1, steps + 1):
        h1, h2, out = forward(w, x)
        d_out = 2 * (out - y) / len(x)
        d_w3, d_b3 = h2.T @ d_out, d_out.sum(0)
        d_h2 = (d_out @ w[4].T) * (h2 > 0)
        d_w2, d_b2 = h1.T @ d_h2, d_h2.sum(0)
        d_h1 = (d_h2 @ w[2].T) * (h1 > 0)
        d_w1, d_b1 = x.T @ d_h1, d_h1.sum(0)
        w = [v - step_size * g for v, g in zip(w, (d_w1, d_b1, d_w2, d_b2, d_w3, d_b3))]
        predictions[step] = forward(w, grid.reshape(-1, 1))[2].reshape(-1)
    return predictions


def test_figure2_task_is_main_pys_first_test_task():
    """main.py's evaluation seeds numpy with 1 and draws each sinusoid test task in turn."""
    import data_generator
    np.random.seed(1)
    inputs, outputs, amplitude, phase = data_generator.SinusoidTasks(20, 1).generate(np.random)
    got = figures.figure2_task(10)
    assert got[0] == amplitude[0] and got[1] == phase[0]
    np.testing.assert_array_equal(got[2], inputs[0, :10, 0])
    np.testing.assert_array_equal(got[3], outputs[0, :10, 0])


def test_figure2_curves_are_the_models_outputs_after_0_1_and_10_steps():
    amplitude, phase, support_x, support_y = figures.figure2_task(10)
    got = figures.adapted_predictions(TRAINED, 'None', support_x, support_y, 0.01)
    want = numpy_fit(checkpoint_weights(), support_x, support_y, 0.01, 10, figures.GRID)
    assert sorted(got) == [0, 1, 10]
    for step in (0, 1, 10):
        assert got[step].shape == figures.GRID.shape
        np.testing.assert_allclose(got[step], want[step], rtol=1e-4, atol=1e-4, err_msg='step %d' % step)
    truth = amplitude * np.sin(figures.GRID - phase)
    assert np.mean((got[10] - truth) ** 2) < np.mean((got[0] - truth) ** 2)   # adapting helps


def sinusoid_results(k):
    """A results block as reproduce.py records it, both sinusoid rows of K=k evaluated from the golden
    expected CSV, their checkpoint the golden trained model."""
    columns = reproduce.read_csv(EXPECTED_CSV)
    entry = {'status': 'done', 'all_steps': {name[len('update'):]: [mean, ci] for name, (mean, _, ci) in columns.items()},
             'checkpoint': str(TRAINED.relative_to(REPO))}
    return {'sine_k{}_maml'.format(k): dict(entry),
            'sine_k{}_pretrained_tuned'.format(k): dict(entry, step_size={'chosen': 0.003})}, columns


def test_figure3_plots_the_rows_csv_columns_and_the_papers_values():
    results, columns = sinusoid_results(5)
    curves, paper = figures.sinusoid_curves_data(results, reproduce.ROWS, 5)
    for name in ('maml', 'pretrained'):
        steps, mean, ci = curves[name]
        np.testing.assert_array_equal(steps, np.arange(11))
        np.testing.assert_array_equal(mean, [columns['update%d' % s][0] for s in range(11)])
        np.testing.assert_array_equal(ci, [columns['update%d' % s][2] for s in range(11)])
    np.testing.assert_array_equal(paper['maml'][0], [1, 5, 10])
    np.testing.assert_allclose(paper['maml'][1], [0.67, 0.38, 0.35])
    np.testing.assert_allclose(paper['pretrained'][1], [2.41, 2.23, 2.19])
    with pytest.raises(figures.FiguresError, match='python reproduce.py sine_k10_maml'):
        figures.sinusoid_curves_data(results, reproduce.ROWS, 10)


def test_omniglot_curves_are_the_validation_sweep_with_the_papers_band():
    results = {'omniglot_5w1s': {'checkpoints': {'validation': {
        '999': {'steps': {'3': [0.9, 0.01]}}, '4999': {'steps': {'3': [0.97, 0.005]}},
        '1999': {'steps': {'3': [0.95, 0.008]}}}}}}
    curves = figures.omniglot_validation_data(results, reproduce.ROWS, ['omniglot_5w1s', 'omniglot_20w1s'])
    assert list(curves) == ['omniglot_5w1s']
    iterations, mean, ci, paper = curves['omniglot_5w1s']
    np.testing.assert_array_equal(iterations, [1000, 2000, 5000])
    np.testing.assert_array_equal(mean, [0.9, 0.95, 0.97])
    np.testing.assert_array_equal(ci, [0.01, 0.008, 0.005])
    np.testing.assert_allclose(paper, (0.987, 0.004))


def test_omniglot_training_curve_is_the_printed_validation_averaged_over_five():
    printed = {str(500 * i): [0.2, 0.5 + 0.01 * i] for i in range(1, 8)}     # as the runner records them
    iterations, accuracy = figures.omniglot_training_curve_data({'omniglot_5w1s': {'curve': printed}}, 'omniglot_5w1s')
    np.testing.assert_array_equal(iterations, [1500, 2000, 2500])     # the middle of each five
    np.testing.assert_allclose(accuracy, [0.53, 0.54, 0.55])
    few = {'curve': {'500': [0.2, 0.5], '1000': [0.2, 0.6]}}
    assert figures.omniglot_training_curve_data({'omniglot_5w1s': few}, 'omniglot_5w1s') is None


BLOCK_MATPLOTLIB = """import sys
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name == 'matplotlib' or name.startswith('matplotlib.'):
            raise ImportError('no matplotlib here')
sys.meta_path.insert(0, Blocked())
sys.path.insert(0, sys.argv[1])
import reproduce
sys.exit(reproduce.main(['--figures', '--results', sys.argv[2]]))
"""


def test_without_matplotlib_figures_say_what_to_install(tmp_path, one_line_error):
    results = tmp_path / 'RESULTS.md'
    reproduce.write_results(results, {})
    before = results.read_text()
    result = subprocess.run([sys.executable, '-c', BLOCK_MATPLOTLIB, str(REPO), str(results)], capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))
    assert result.returncode == 2
    one_line_error(result, 'matplotlib', 'pip install -r requirements-figures.txt')
    assert results.read_text() == before and not (tmp_path / 'figures').exists()


@pytest.fixture
def matplotlib_installed():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pytest.skip('needs matplotlib: pip install -r requirements-figures.txt')


@pytest.mark.slow
def test_the_figures_are_written_and_embedded(tmp_path, matplotlib_installed):
    from PIL import Image
    results = {}
    for k in (5, 10):
        results.update(sinusoid_results(k)[0])
    for name in ('omniglot_5w1s', 'omniglot_5w1s_tf13_moments', 'omniglot_20w1s'):
        step = str(reproduce.ROWS[name].steps[-1])    # 3 for 5-way, 5 for 20-way
        results[name] = {'checkpoints': {'validation': {'999': {'steps': {step: [0.9, 0.01]}},
                                                        '1999': {'steps': {step: [0.95, 0.008]}}}}}
    written = figures.write_figures(results, reproduce.ROWS, tmp_path / 'figures', REPO)
    sizes = {p.name: Image.open(p).size for _, p, _ in written}
    assert sizes == {'figure2_sinusoid_k5.png': (1000, 400), 'figure3_sinusoid_k5.png': (600, 400),
                     'figure2_sinusoid_k10.png': (1000, 400), 'figure3_sinusoid_k10.png': (600, 400),
                     'omniglot_5w1s_batch_norm_meta_gradients.png': (700, 400),
                     'omniglot_20w1s_validation.png': (700, 400)}
    # RESULTS.md (in tmp_path) embeds each under its table
    embedded = {table: '\n'.join(reproduce.render_figures(table, tmp_path)) for table in ('sinusoid', 'omniglot')}
    for name in sizes:
        assert '](figures/{})'.format(name) in embedded['omniglot' if name.startswith('omniglot') else 'sinusoid']


@pytest.mark.slow
def test_tensorboard_reads_a_runs_events(tmp_path):
    """The live curves: TensorBoard (requirements-figures.txt) reads what main.py writes, the six
    scalars of a sinusoid run (before adapting and after each of 5 steps) and the graph."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        pytest.skip('needs tensorboard: pip install -r requirements-figures.txt')
    from tests.cli import run_main
    result = run_main('--datasource=sinusoid', '--norm=None', '--metatrain_iterations=201', '--logdir=' + str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    events = EventAccumulator(str(next(tmp_path.glob('cls_*'))))
    events.Reload()
    scalars = events.Tags()['scalars']
    # tf.summary names the tags as it did for the reference: spaces and commas become underscores
    assert sorted(scalars) == sorted(['metatrain_Pre-update_loss'] + [
        'metatrain_Post-update_loss__step_%d' % j for j in range(1, 6)])
    assert [e.step for e in events.Scalars('metatrain_Pre-update_loss')] == [0, 100, 200]
    assert events.Tags()['graph']


def test_the_baselines_step_size_is_tuned_on_validation_tasks_not_the_test_tasks():
    """The pre-trained baseline's step size (the paper: "automatically tuned", Section 5.1): the
    candidate with the lowest mean MSE after 10 steps on validation tasks, which are drawn apart from
    main.py's test tasks; the MSE is the model's (checked against the numpy network)."""
    import data_generator
    row = reproduce.ROWS['sine_k10_pretrained_tuned']
    assert row.tune_step_size and row.flags == reproduce.ROWS['sine_k10_pretrained'].flags
    tasks = 4
    inputs, outputs, _, _ = data_generator.SinusoidTasks(20, tasks).generate(
        np.random.RandomState(reproduce.SINE_VALIDATION_SEED))
    assert not np.allclose(inputs[0, :10, 0], figures.figure2_task(10)[2])       # not the first test task
    got = reproduce.sinusoid_adaptation(TRAINED, row, 0.01, tasks, 10, reproduce.SINE_VALIDATION_SEED)
    weights = checkpoint_weights()
    want = np.zeros(11)
    for t in range(tasks):
        fits = numpy_fit(weights, inputs[t, :10, 0], outputs[t, :10, 0], 0.01, 10, inputs[t, 10:, 0])
        before = numpy_fit(weights, inputs[t, :10, 0], outputs[t, :10, 0], 0.01, 0, inputs[t, :10, 0])[0]
        # as main.py's CSV: column 0 is the loss before adaptation on the support points, the rest on the query
        want += np.array([np.mean((before - outputs[t, :10, 0]) ** 2)] +
                         [np.mean((fits[s] - outputs[t, 10:, 0]) ** 2) for s in range(1, 11)]) / tasks
    np.testing.assert_allclose(got, want, rtol=1e-4)
    tuned = reproduce.tune_step_size(row, TRAINED, (0.001, 0.01, 0.1), tasks=tasks)
    assert tuned['chosen'] == min((0.001, 0.01, 0.1), key=lambda a: tuned['validation_mse'][str(a)])
    assert tuned['validation_mse']['0.01'] == pytest.approx(want[10], rel=1e-4)
