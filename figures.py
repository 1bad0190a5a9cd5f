"""The paper's figures, drawn from the rows' own outputs (RESULTS.md's data block and their checkpoints).

    python reproduce.py --figures      # writes figures/*.png beside RESULTS.md, which embeds them

- Figure 2 (the sinusoid, one test task): the true function, the K support points, and the curves
  after 0, 1 and 10 gradient steps, MAML beside the pre-trained baseline, for K = 5 and K = 10. MAML
  is fine-tuned with the paper's step size (0.01, Section 5.1), the baseline with the step size tuned
  on validation tasks (the paper: "using an automatically tuned step size", Section 5.1; Figure 2:
  "with a tuned step size").
- Figure 3: mean squared error against gradient steps 0-10 at meta-test time, MAML against the
  pre-trained baseline, the 95% interval as a band, the paper's values on the same axes.
- For each Omniglot row: validation accuracy against iteration (its --validate_checkpoints data), the
  paper's number and interval as a band; the two meta-gradients through batch norm on one plot. A
  dotted line beside it: the validation accuracy main.py printed while training (one meta-batch
  every 500 iterations, averaged over 5), which covers the whole run where the sweep does not.

The `*_data` functions return what a figure plots (tests check them against their sources); the
`draw_*` functions need matplotlib (requirements-figures.txt).
"""
from pathlib import Path

import numpy as np

STEPS = 10                    # gradient steps at meta-test time
FIGURE2_STEPS = (0, 1, 10)
GRID = np.linspace(-5.0, 5.0, 200)
SINE_ROWS = {'maml': 'sine_k{}_maml', 'pretrained': 'sine_k{}_pretrained_tuned'}
BATCH_NORM_ROWS = ('omniglot_5w1s', 'omniglot_5w1s_tf13_moments')
FIGURE_SIZE = (10, 4)         # inches; PNGs at DPI dots per inch
DPI = 100


class FiguresError(Exception):
    """A figure cannot be made (a missing dependency or row): printed as one line."""


def require_matplotlib():
    """matplotlib.pyplot on the Agg backend, or FiguresError saying what to install."""
    try:
        import matplotlib
    except ImportError:
        raise FiguresError('the figures need matplotlib: pip install -r requirements-figures.txt') from None
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


## The data of each figure
def sinusoid_curves_data(results, rows, k):
    """Figure 3 for K=k: {'maml', 'pretrained'} -> (steps 0..10, mean MSE, 95% CI half-width) from each
    row's evaluation (the CSV's columns update0..update10), and the paper's values: {name: (steps, values)}."""
    curves, paper = {}, {}
    for name, pattern in SINE_ROWS.items():
        row_name = pattern.format(k)
        result = results.get(row_name)
        if not result or result.get('status') != 'done' or 'all_steps' not in result:
            raise FiguresError('Figure 3 needs row {} evaluated by this version of reproduce.py: '
                               'python reproduce.py {}'.format(row_name, row_name))
        steps = np.arange(STEPS + 1)
        mean_ci = np.array([result['all_steps'][str(s)] for s in steps], float)
        curves[name] = (steps, mean_ci[:, 0], mean_ci[:, 1])
        marks = [(s, p[0]) for s, p in zip(rows[row_name].steps, rows[row_name].paper) if p]
        if marks:
            paper[name] = (np.array([s for s, _ in marks]), np.array([v for _, v in marks]))
    return curves, paper


def figure2_task(k, seed=1):
    """The test task Figure 2 shows: main.py's first sinusoid test task for K=k (numpy seeded with 1,
    as its evaluation draws them): (amplitude, phase, support x [k], support y [k])."""
    import data_generator
    inputs, outputs, amplitude, phase = data_generator.SinusoidTasks(2 * k, 1).generate(np.random.RandomState(seed))
    return float(amplitude[0]), float(phase[0]), inputs[0, :k, 0], outputs[0, :k, 0]


def sinusoid_fits_data(results, rows, k, repo=None):
    """Figure 2 for K=k: the task, and {'maml', 'pretrained'} -> (step size, {steps: predictions on
    GRID}) for FIGURE2_STEPS, each model restored from its row's checkpoint and fine-tuned on the
    task's support points with its step size."""
    amplitude, phase, support_x, support_y = figure2_task(k)
    fits = {}
    for name, pattern in SINE_ROWS.items():
        row = rows[pattern.format(k)]
        result = results.get(row.name)
        if not result or result.get('status') != 'done' or 'checkpoint' not in result:
            raise FiguresError('Figure 2 needs row {} evaluated by this version of reproduce.py: '
                               'python reproduce.py {}'.format(row.name, row.name))
        step_size = (float(result['step_size']['chosen']) if result.get('step_size')
                     else float(row.flag('update_lr', '0.001')))
        checkpoint = Path(repo or Path(__file__).resolve().parent) / result['checkpoint']
        fits[name] = (step_size, adapted_predictions(checkpoint, row.flag('norm', 'batch_norm'), support_x, support_y,
                                                     step_size))
    return (amplitude, phase, support_x, support_y), fits


def adapted_predictions(checkpoint, norm, support_x, support_y, step_size, grid=GRID, steps=FIGURE2_STEPS):
    """The sinusoid network of `checkpoint` on `grid` before adapting and after each of max(steps)
    gradient steps of `step_size` on the support points: {step: predictions [len(grid)]}."""
    import tensorflow as tf
    import experiment
    from maml import MAML, ModelConfig
    tf1 = tf.compat.v1
    config = ModelConfig(datasource='sinusoid', norm=norm, meta_batch_size=1, update_batch_size=len(support_x),
                         update_lr=step_size, pretraining=False)
    with tf.Graph().as_default():
        model = MAML(config, 1, 1, test_num_updates=max(steps))
        model.construct_model(prefix='metaval_')
        grid_input = tf1.placeholder(tf.float32, [len(grid), 1])
        with tf1.variable_scope('model', reuse=True):
            before = model.forward(grid_input, model.weights)
        feed = {model.inputa: support_x.reshape(1, -1, 1), model.labela: support_y.reshape(1, -1, 1),
                model.inputb: grid.reshape(1, -1, 1), model.labelb: np.zeros((1, len(grid), 1)),
                grid_input: grid.reshape(-1, 1)}
        with tf1.Session() as sess:
            sess.run(tf1.global_variables_initializer())
            experiment.restore(sess, str(checkpoint), full_state=False)
            values = sess.run([before] + model.metaval_outputbs, feed)
    return {s: np.asarray(values[s]).reshape(-1) for s in steps}


def omniglot_validation_data(results, rows, names):
    """For each row of `names` that has --validate_checkpoints data: (iterations, accuracy, 95% CI
    half-width) after the step the paper reports, the checkpoint model{N} counted as N + 1 iterations
    trained, and the paper's (mean, CI)."""
    curves = {}
    for name in names:
        result = results.get(name, {})
        sweep = result.get('checkpoints')
        if not sweep:
            continue
        step = str(rows[name].steps[-1])
        points = sorted((int(n) + 1, entry['steps'][step]) for n, entry in sweep['validation'].items())
        curves[name] = (np.array([p[0] for p in points]), np.array([p[1][0] for p in points]),
                        np.array([p[1][1] for p in points]), rows[name].paper[-1])
    return curves


TRAINING_CURVE_AVERAGE = 5   # consecutive validation prints averaged (2,500 iterations): one is 160-320 answers


def omniglot_training_curve_data(results, name):
    """The validation accuracy main.py printed while training the row (one validation meta-batch every
    500 iterations, after num_updates inner steps; the runner keeps them as the row's 'curve'):
    (iterations, accuracy averaged over TRAINING_CURVE_AVERAGE consecutive prints, placed at the
    middle one), or None where the row has fewer prints."""
    curve = results.get(name, {}).get('curve') or {}
    if len(curve) < TRAINING_CURVE_AVERAGE:
        return None
    iterations = np.array(sorted(int(i) for i in curve))
    post = np.array([curve[str(i)][1] for i in iterations], float)
    averaged = np.convolve(post, np.ones(TRAINING_CURVE_AVERAGE) / TRAINING_CURVE_AVERAGE, mode='valid')
    middle = TRAINING_CURVE_AVERAGE // 2
    return iterations[middle:middle + len(averaged)], averaged


## Drawing
def draw_figure2(task, fits, k, path):
    plt = require_matplotlib()
    amplitude, phase, support_x, support_y = task
    figure, axes = plt.subplots(1, 2, figsize=FIGURE_SIZE, sharey=True)
    for axis, (name, title) in zip(axes, (('maml', 'MAML'), ('pretrained', 'pretrained, tuned step size'))):
        step_size, predictions = fits[name]
        axis.plot(GRID, amplitude * np.sin(GRID - phase), color='red', label='ground truth')
        for step, style in zip(FIGURE2_STEPS, (':', '--', '-')):
            axis.plot(GRID, predictions[step], style, color='green' if name == 'maml' else 'tab:blue',
                      label='after {} grad step{}'.format(step, '' if step == 1 else 's') if step else 'pre-update')
        axis.plot(support_x, support_y, '^', color='purple', markersize=9, label='{} points used for grad'.format(k))
        axis.set_title('{}, K={}, step size {}'.format(title, k, step_size))
        axis.set_xlim(-5, 5)
        axis.legend(fontsize=8, loc='lower right')
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)


def draw_figure3(curves, paper, k, path):
    plt = require_matplotlib()
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, color, label in (('maml', 'green', 'MAML (ours)'), ('pretrained', 'tab:blue', 'pretrained (ours)')):
        steps, mean, ci = curves[name]
        axis.plot(steps, mean, '-o', color=color, markersize=3, label=label)
        axis.fill_between(steps, mean - ci, mean + ci, color=color, alpha=0.2)
        if name in paper:
            axis.plot(*paper[name], 'x', color=color, markersize=9, markeredgewidth=2,
                      label='{}: the paper'.format(label.split(' (')[0]))
    axis.set_xticks(range(STEPS + 1))
    axis.set_ylim(bottom=0)
    _label_and_save(plt, figure, axis, 'number of gradient steps', 'mean squared error',
                    'K={} test-time learning curves (600 tasks, 95% interval)'.format(k), path)


def draw_omniglot(curves, training_curves, names, title, path):
    plt = require_matplotlib()
    figure, axis = plt.subplots(figsize=(7, 4))
    colors = ('green', 'tab:red', 'tab:blue', 'tab:purple')
    paper_drawn = set()
    for name, color in zip(names, colors):
        iterations, mean, ci, (paper_mean, paper_ci) = curves[name]
        axis.plot(iterations, 100 * mean, '-o', color=color, markersize=3,
                  label='{}: 600 validation tasks per checkpoint'.format(name))
        axis.fill_between(iterations, 100 * (mean - ci), 100 * (mean + ci), color=color, alpha=0.15)
        if training_curves.get(name) is not None:
            printed_at, accuracy = training_curves[name]
            axis.plot(printed_at, 100 * accuracy, ':', color=color, linewidth=1,
                      label='{}: while training (mean of {} validation batches)'.format(name, TRAINING_CURVE_AVERAGE))
        if (paper_mean, paper_ci) not in paper_drawn:
            paper_drawn.add((paper_mean, paper_ci))
            axis.axhspan(100 * (paper_mean - paper_ci), 100 * (paper_mean + paper_ci), color='gray', alpha=0.3,
                         label='the paper: {:.1f} ± {:.1f}'.format(100 * paper_mean, 100 * paper_ci))
    _label_and_save(plt, figure, axis, 'meta-training iterations', 'accuracy % (validation tasks)', title, path,
                    legend_at='lower right')


def _label_and_save(plt, figure, axis, xlabel, ylabel, title, path, legend_at='best'):
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.legend(fontsize=8, loc=legend_at)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)


def write_figures(results, rows, folder, repo=None):
    """Every figure whose rows have run: [(name, path, caption)] of the PNGs written in `folder`."""
    require_matplotlib()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for k in (5, 10):
        try:
            task, fits = sinusoid_fits_data(results, rows, k, repo)
            curves, paper = sinusoid_curves_data(results, rows, k)
        except FiguresError as missing:
            print('figures: K={}: {}'.format(k, missing), flush=True)
            continue
        path = folder / 'figure2_sinusoid_k{}.png'.format(k)
        draw_figure2(task, fits, k, path)
        written.append(('sinusoid', path, 'Figure 2, K={}: one test task, the curves after 0, 1 and 10 steps'.format(k)))
        path = folder / 'figure3_sinusoid_k{}.png'.format(k)
        draw_figure3(curves, paper, k, path)
        written.append(('sinusoid', path, 'Figure 3, K={}: MSE against gradient steps, 95% interval; x: the '
                                          'paper'.format(k)))
    omniglot = [name for name, row in rows.items() if row.table == 'omniglot']
    curves = omniglot_validation_data(results, rows, omniglot)
    training = {name: omniglot_training_curve_data(results, name) for name in curves}
    if all(name in curves for name in BATCH_NORM_ROWS):
        path = folder / 'omniglot_5w1s_batch_norm_meta_gradients.png'
        draw_omniglot(curves, training, list(BATCH_NORM_ROWS), 'Omniglot 5-way 1-shot, the meta-gradient through batch '
                      'norm:\nTF 1.2\'s (the default) against TF >= 1.3\'s (--moments_stop_gradient=True)', path)
        written.append(('omniglot', path, 'Omniglot 5-way 1-shot, both meta-gradients through batch norm'))
    for name in omniglot:
        if name in curves and name not in BATCH_NORM_ROWS:
            path = folder / '{}_validation.png'.format(name)
            draw_omniglot(curves, training, [name], '{}: validation accuracy'.format(rows[name].label), path)
            written.append(('omniglot', path, rows[name].label))
    return written
