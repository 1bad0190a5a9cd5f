"""--fast_paths: auto (fast_paths.py) against off (maml.py's plain definition, tf.map_fn and autodiff).

For every configuration (5-way and 20-way, second and first order, batch norm with either math of its
moments, layer norm and no norm, max pooling, the sinusoid's dense net; one device and two towers) the
two give the same query outputs, meta-gradients and weights after three meta-updates, within the
golden cases' rule for tolerances. A network the fast paths were not written for (another activation,
a fifth layer) runs the plain definition under auto and says so. The golden cases pass with both paths
(tests/test_golden.py).
"""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import devices
import fast_paths
import maml
from maml import MAML, ModelConfig
from tests.conftest import REPO

tf1 = tf.compat.v1
TASKS = 4
CONFIGS = {
    'omniglot_5way': dict(datasource='omniglot'),
    'omniglot_20way': dict(datasource='omniglot', num_classes=20),
    'omniglot_tf13_moments': dict(datasource='omniglot', moments_stop_gradient=True),
    'omniglot_first_order': dict(datasource='omniglot', stop_grad=True),
    'omniglot_layer_norm': dict(datasource='omniglot', norm='layer_norm'),
    'omniglot_no_norm': dict(datasource='omniglot', norm='None'),
    'miniimagenet_max_pool': dict(datasource='miniimagenet', max_pool=True, num_filters=4, update_lr=0.001),
    'sinusoid': dict(datasource='sinusoid', norm='None', update_batch_size=5),
}
PLACEMENTS = ('one device', 'towers')
# Towers split the tasks, nothing else: they are checked on the configurations that differ in the
# operations each tower runs (a second or first order meta-gradient, max pooling, the dense net).
ON_TOWERS = ('omniglot_5way', 'omniglot_first_order', 'miniimagenet_max_pool', 'sinusoid')
FAST = {('omniglot_5way', 'one device'), ('sinusoid', 'one device')}   # the rest run with --full
ADAM_STEPS = 3
# Max pooling: a window whose two largest inputs lie within float32 rounding of each other sends its
# gradient to either, as two implementations happen to round; MiniImagenet's 84x84 maps have a few such
# windows on most random draws, and one flip moves the meta-gradient by up to percents (both paths are
# as sensitive: 1e-6 of noise on the inputs moves each as much). A draw says nothing about the math
# then, so up to MAX_POOL_DRAWS are tried; a fast path that is wrong fails on every one.
MAX_POOL_DRAWS = 4


def model_config(name, path):
    fields = dict(num_classes=5, meta_batch_size=TASKS, update_batch_size=1, update_lr=0.05, num_updates=2,
                  num_filters=8, pretraining=False, fast_paths=path)
    fields.update(CONFIGS[name])
    return ModelConfig(**fields)


def dims(config):
    if config.datasource == 'sinusoid':
        return 1, 1
    return (84 * 84 * 3 if config.datasource == 'miniimagenet' else 28 * 28), config.num_classes


def feed_values(config, rng):
    dim_input, dim_output = dims(config)
    if config.datasource == 'sinusoid':
        x = rng.uniform(-5, 5, [2, TASKS, 2 * config.update_batch_size, 1])
        y = 3 * np.sin(x)
        return x[0], y[0], x[1], y[1]
    examples = config.num_classes * config.update_batch_size
    labels = np.tile(np.eye(config.num_classes, dtype=np.float32), (TASKS, config.update_batch_size, 1))
    images = rng.rand(2, TASKS, examples, dim_input).astype(np.float32)   # colour images: any level
    if config.datasource == 'omniglot':
        images = (images < 0.2).astype(np.float32)   # strokes of 1, mostly 0
    return images[0], labels, images[1], labels


def meta_update(name, path, placement, initial=None, draw=0):
    """{quantity: value} of one model: query outputs after each of 3 steps, the post-update losses, the
    meta-gradient and the weights after three Adam steps; and the initial weights."""
    config = model_config(name, path)
    dim_input, dim_output = dims(config)
    placement = placement or devices.single_device()
    with tf.Graph().as_default():
        tf1.set_random_seed(3 + draw)
        with devices.model_placement(placement):
            model = MAML(config, dim_input, dim_output, test_num_updates=3, towers=placement.towers,
                         param_device=placement.param_device)
            model.construct_model(prefix='metatrain_')
        assert all((fast is None) == (path == 'off') for fast in model.fast_paths)
        variables = {v.op.name: v for v in tf1.trainable_variables()}
        inputs = (model.inputa, model.labela, model.inputb, model.labelb)
        feed = dict(zip(inputs, feed_values(config, np.random.RandomState(draw))))
        with placement.session() as sess:
            sess.run(tf1.global_variables_initializer())
            if initial is None:
                initial = sess.run(variables)
            for key, variable in variables.items():
                variable.load(initial[key], sess)  # noqa
            gradients = {'grad/' + v.op.name: g for g, v in model.gvs}
            values = sess.run({**{'outputbs%d' % (j + 1): o for j, o in enumerate(model.outputbs)},
                               **{'loss_post%d' % (j + 1): l for j, l in enumerate(model.total_losses2)},
                               **gradients}, feed)
            for _ in range(ADAM_STEPS):
                sess.run(model.metatrain_op, feed)
            values.update({'after/' + k: v for k, v in sess.run(variables).items()})
    return values, initial


def assert_same(plain, fast):
    """Within the golden cases' rule for tolerances (tests/golden/README.md): values and weights to
    1e-4 of their largest magnitude, gradients to 5e-3 of theirs; gradients that are rounding noise
    on one side (the conv biases before batch norm, which it cancels: exact zeros on the fast paths)
    to 5e-3 of the model's largest gradient, and their Adam steps not at all."""
    assert set(plain) == set(fast)
    largest_gradient = max(np.abs(v).max() for k, v in plain.items() if k.startswith('grad/'))
    noise = {k.split('/', 1)[1] for k, v in plain.items() if k.startswith('grad/')
             and np.abs(v).max() < 1e-4 * largest_gradient}
    for key, want in plain.items():
        got = fast[key]
        variable = key.split('/', 1)[1] if '/' in key else None
        if key.startswith('after/') and variable in noise:
            continue
        if key.startswith('grad/'):
            allowed = 5e-3 * (largest_gradient if variable in noise else np.abs(want).max())
        else:
            allowed = 1e-4 * np.abs(want).max()
        assert np.abs(np.asarray(got) - want).max() <= allowed, (key, np.abs(np.asarray(got) - want).max(), allowed)


@pytest.mark.parametrize('name, placement', [
    pytest.param(name, placement, marks=[] if (name, placement) in FAST else [pytest.mark.slow])
    for name in CONFIGS for placement in PLACEMENTS if placement == 'one device' or name in ON_TOWERS])
def test_auto_and_off_give_the_same_meta_update(name, placement):
    towers = devices.core_towers(TASKS, count=2) if placement == 'towers' else None
    misses = []
    for draw in range(MAX_POOL_DRAWS if CONFIGS[name].get('max_pool') else 1):
        plain, initial = meta_update(name, 'off', towers, draw=draw)
        fast, _ = meta_update(name, 'auto', towers, initial, draw=draw)
        assert len([k for k in plain if k.startswith('grad/')]) >= 4
        try:
            assert_same(plain, fast)
            return
        except AssertionError as miss:
            misses.append(miss)
    raise misses[0]


def test_every_tower_runs_the_path_chosen(monkeypatch):
    """auto: fast paths on every tower, with each device's capabilities; off: the plain definition on
    every tower (its tf.map_fn's loop, and none of the fast paths' operations)."""
    for path in ('auto', 'off'):
        config = ModelConfig(datasource='omniglot', num_classes=5, meta_batch_size=TASKS, update_batch_size=1,
                             num_updates=1, num_filters=2, pretraining=False, fast_paths=path)
        placement = devices.local_placement('/cpu:0,/cpu:1')
        with tf.Graph().as_default() as graph:
            with devices.model_placement(placement):
                model = MAML(config, 784, 5, test_num_updates=1, towers=placement.towers,
                             param_device=placement.param_device)
                model.construct_model(prefix='metatrain_')
            ops = graph.get_operations()
        if path == 'auto':
            assert all(isinstance(fast, fast_paths.FastPaths) for fast in model.fast_paths)
            assert [fast.capabilities.grouped_conv for fast in model.fast_paths] == \
                [fast_paths.Capabilities.of(device).grouped_conv for device in placement.towers]
        else:
            assert model.fast_paths == [None, None]
            loops = {op.device for op in ops if op.type in ('While', 'StatelessWhile')}
            assert loops == set(placement.towers), loops
            assert not [op for op in ops if op.type in ('ExtractImagePatches', 'FusedBatchNormGradV3')]


def test_the_pinned_fingerprint_is_the_plain_code_checked_here():
    """PLAIN_NETWORK_FINGERPRINT names the plain network code these tests hold equal to the fast paths:
    with it, auto trusts them without building a small instance of both at every start."""
    assert fast_paths.plain_network_fingerprint(MAML) == fast_paths.PLAIN_NETWORK_FINGERPRINT, (
        'the plain network code changed: run tests/test_fast_paths.py --full, and if auto and off agree set '
        'fast_paths.PLAIN_NETWORK_FINGERPRINT = {!r}'.format(fast_paths.plain_network_fingerprint(MAML)))


CHANGED_NETWORK = """
import sys
sys.path.insert(0, sys.argv[1])
import tensorflow as tf
from maml import MAML, ModelConfig
config = ModelConfig(datasource='omniglot', num_classes=5, meta_batch_size=2, update_batch_size=1, num_updates=1,
                     num_filters=4, pretraining=False)
with tf.Graph().as_default():
    model = MAML(config, 784, 5, test_num_updates=1)
    model.construct_model(prefix='metatrain_')
print('plain definition on every tower:', all(fast is None for fast in model.fast_paths))
"""


def run_changed_network(tmp_path, file_name, changes):
    """The model code copied to tmp_path with `changes` ([(old, new)]) made in file_name, a model built
    under auto: what it printed."""
    for name in ('maml.py', 'utils.py', 'fast_paths.py', 'special_grads.py', 'devices.py', 'experiment.py'):
        shutil.copy(REPO / name, tmp_path / name)
    source = (tmp_path / file_name).read_text()
    for old, new in changes:
        assert source.count(old) >= 1, old
        source = source.replace(old, new)
    (tmp_path / file_name).write_text(source)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
    result = subprocess.run([sys.executable, '-c', CHANGED_NETWORK, str(tmp_path)], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def assert_steps_aside(stdout):
    """Under auto the model runs the plain definition (whose numbers are the plain path's by
    construction) and says so in one line."""
    lines = [line for line in stdout.splitlines() if line.startswith('fast paths:')]
    assert len(lines) == 1, stdout
    assert 'not the one they were written for' in lines[0] and 'running the plain definition (maml.py) instead' in \
        lines[0], lines[0]
    assert 'plain definition on every tower: True' in stdout


def test_another_activation_takes_the_plain_path_and_says_so(tmp_path):
    """ELU in place of ReLU (utils.normalize's default): the fast paths' hand-written derivatives
    assume a ReLU, so under auto the model must run the plain definition and say so."""
    assert_steps_aside(run_changed_network(tmp_path, 'utils.py', [('activation=tf.nn.relu', 'activation=tf.nn.elu')]))


@pytest.mark.slow
def test_a_fifth_layer_takes_the_plain_path_and_says_so(tmp_path):
    """Five conv blocks (the head renamed w6, b6): the fast paths build four."""
    assert_steps_aside(run_changed_network(tmp_path, 'maml.py', [('range(4)', 'range(5)'), ("'w5'", "'w6'"),
                                                                 ("'b5'", "'b6'")]))


@pytest.mark.slow
def test_a_network_checked_equal_on_a_small_instance_keeps_the_fast_paths(monkeypatch, capsys):
    """Code that differs from the pinned fingerprint but computes the same numbers (a comment, say)
    keeps the fast paths, after building a small instance of both."""
    monkeypatch.setattr(fast_paths, 'PLAIN_NETWORK_FINGERPRINT', 'something else')
    config = ModelConfig(datasource='omniglot', num_classes=5, meta_batch_size=2, update_batch_size=1,
                         num_updates=1, num_filters=2, pretraining=False)
    with tf.Graph().as_default():
        model = MAML(config, 784, 5, test_num_updates=1)
        model.construct_model(prefix='metatrain_')
    assert isinstance(model.fast_paths[0], fast_paths.FastPaths)
    assert 'computes the same numbers both ways: they run' in capsys.readouterr().out


def test_a_fast_path_that_computes_something_else_is_caught_on_the_small_instance(monkeypatch, capsys):
    """The check itself: with the fast paths' loss made wrong, a model whose code differs from the
    pinned fingerprint runs the plain definition and says what differs."""
    monkeypatch.setattr(fast_paths, 'PLAIN_NETWORK_FINGERPRINT', 'something else')
    real_loss = fast_paths.FastPaths.loss
    monkeypatch.setattr(fast_paths.FastPaths, 'loss', lambda self, pred, label: 1.01 * real_loss(self, pred, label))
    config = ModelConfig(datasource='sinusoid', norm='None', meta_batch_size=2, pretraining=False)
    with tf.Graph().as_default():
        model = MAML(config, 1, 1, test_num_updates=1)
        model.construct_model(prefix='metatrain_')
    assert model.fast_paths == [None]
    assert 'its outputs differ on a small instance); running the plain definition' in capsys.readouterr().out
    assert maml.FAST_PATHS == ('auto', 'off')


def test_main_trains_the_same_weights_with_fast_paths_off(tmp_path, read_checkpoint):
    """main.py --fast_paths=off trains the plain definition to the weights auto trains (the sinusoid,
    20 meta-updates: the same to float32 rounding)."""
    from tests.cli import run_main
    trained = {}
    for path in ('auto', 'off'):
        result = run_main('--datasource=sinusoid', '--norm=None', '--meta_batch_size=4', '--metatrain_iterations=20',
                          '--log=False', '--fast_paths=' + path, '--logdir=' + str(tmp_path / path))
        assert result.returncode == 0, result.stderr[-2000:]
        trained[path] = read_checkpoint(next((tmp_path / path).glob('*/model19.index')).with_suffix(''))
    assert set(trained['auto']) == set(trained['off'])
    for name, want in trained['off'].items():
        np.testing.assert_allclose(trained['auto'][name], want, rtol=1e-4, atol=1e-4 * np.abs(want).max(), err_msg=name)
