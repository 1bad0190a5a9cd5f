"""The fast paths' first inner step from the shared weights (plain convolutions over all tasks'
examples, each task's kernel gradient from a probe: FastPaths._support_pass_from_shared_weights)
against their per-task step it replaces; the conv biases that batch norm cancels."""
import numpy as np
import pytest
import tensorflow as tf

from fast_paths import CONV_BIASES
from maml import MAML, ModelConfig

tf1 = tf.compat.v1
TASKS, WAY = 3, 5

CONFIGS = {
    'omniglot': dict(datasource='omniglot'),
    'omniglot_tf13_moments': dict(datasource='omniglot', moments_stop_gradient=True),
    'omniglot_first_order': dict(datasource='omniglot', stop_grad=True),
    'omniglot_no_norm': dict(datasource='omniglot', norm='None'),
    'omniglot_layer_norm': dict(datasource='omniglot', norm='layer_norm'),
    'miniimagenet': dict(datasource='miniimagenet', max_pool=True),
}
SLOW_CONFIGS = ('omniglot_tf13_moments', 'omniglot_first_order', 'omniglot_no_norm')


DRAWS = 8   # random draws of weights and images tried until one is conclusive (see below)


def build(name, rng):
    """The model of CONFIGS[name] (8 filters) with random weights (conv biases too), and a feed."""
    fields = dict(num_classes=WAY, meta_batch_size=TASKS, update_batch_size=1, update_lr=0.1, num_updates=1,
                  num_filters=8, **CONFIGS[name])
    config = ModelConfig(**fields)
    size = 84 * 84 * 3 if config.datasource == 'miniimagenet' else 28 * 28
    model = MAML(config, size, WAY, test_num_updates=1)
    model.construct_model(prefix='metatrain_')
    return model, random_feed(model, rng)


def random_feed(model, rng):
    size = model.dim_input
    labels = np.tile(np.eye(WAY, dtype=np.float32), (TASKS, 1, 1))
    return {model.inputa: rng.rand(TASKS, WAY, size), model.inputb: rng.rand(TASKS, WAY, size),
            model.labela: labels, model.labelb: labels}


def randomize(sess, model, rng):
    for variable in tf1.trainable_variables():
        shape = variable.shape.as_list()
        variable.load((0.3 * rng.randn(*shape)).astype(np.float32), sess)   # noqa


def build_first_step_both_ways(model):
    """The first inner step from the shared weights, then per task. For each: ([fast weights, query
    output, meta-gradient], the ReLUs' outputs, the max pools' inputs)."""
    graph = tf1.get_default_graph()
    inputs = (model.inputa, model.labela, model.inputb, model.labelb)
    fast = model.fast_paths[0]
    steps = []
    for from_shared in (True, False):
        before = set(graph.get_operations())
        fast_weights, outputb, lossb = fast._inner_step(*inputs, fast.weights_per_task(TASKS),   # noqa: SLF001
                                                        from_shared_weights=from_shared)
        meta_gradient = tf.gradients(tf.reduce_sum(lossb), tf1.trainable_variables())
        new_ops = [op for op in graph.get_operations() if op not in before]
        steps.append(([fast_weights, outputb, [g for g in meta_gradient if g is not None]],
                      [op.outputs[0] for op in new_ops if op.type == 'Relu'],
                      [op.inputs[0] for op in new_ops if op.type == 'MaxPool']))
    return steps


def tasks_first(values):
    """An activation as [tasks, examples, H, W, filters], from any of the layouts the model uses."""
    if values.ndim == 4 and values.shape[0] == TASKS * WAY:   # the tasks in the batch
        return values.reshape((TASKS, WAY) + values.shape[1:])
    if values.ndim == 4:   # the tasks side by side in the channels
        values = values.reshape(values.shape[:3] + (TASKS, -1))
    if values.shape[0] == WAY and values.shape[3] == TASKS:   # [examples, H, W, tasks, filters]
        return values.transpose(3, 0, 1, 2, 4)
    return values


def smooth_piece(relu_outputs, pool_inputs):
    """Which smooth piece of the network a pass is on: every ReLU's signs and every 2x2 max pool's choice."""
    signs = [tasks_first(y) > 0 for y in relu_outputs]
    choices = []
    for x in map(tasks_first, pool_inputs):
        tasks, examples, height, width, filters = x.shape
        windows = x[:, :, :height // 2 * 2, :width // 2 * 2].reshape(
            tasks, examples, height // 2, 2, width // 2, 2, filters).transpose(0, 1, 2, 4, 6, 3, 5)
        choices.append(windows.reshape(windows.shape[:5] + (4,)).argmax(-1))
    return signs + choices


@pytest.mark.parametrize('name', [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW_CONFIGS else [])
                                  for n in sorted(CONFIGS)])
def test_first_step_from_shared_weights_is_the_per_task_step(name):
    """Both compute the same piecewise-smooth function in a different float32 order. Where a ReLU's
    input, or two candidates of a max pool, lie within rounding of each other, the two can land on
    different pieces: the meta-gradient of these large random weights then jumps by up to ~1%
    (MiniImagenet, 8 draws: 1 with autodiff batch norm, 4 with the fused gradient). Such a draw says
    nothing about the math, so it is skipped; the first draw on which both take the same piece
    everywhere is compared (a path that is wrong on every piece fails either way)."""
    rng = np.random.RandomState(0)
    with tf.Graph().as_default():
        model, feed = build(name, rng)
        (shared, shared_relus, shared_pools), (per_task, per_task_relus, per_task_pools) = \
            build_first_step_both_ways(model)
        with tf1.Session() as sess:
            sess.run(tf1.global_variables_initializer())
            for draw in range(DRAWS):
                feed = feed if draw == 0 else random_feed(model, rng)
                randomize(sess, model, rng)
                plain, plain_piece, stepped, stepped_piece = sess.run(
                    [shared, (shared_relus, shared_pools), per_task, (per_task_relus, per_task_pools)], feed)
                same_piece = zip(smooth_piece(*plain_piece), smooth_piece(*stepped_piece))
                if all(np.array_equal(a, b) for a, b in same_piece):
                    break
            else:
                pytest.fail('no draw of {} where both steps took the same ReLU signs and max-pool choices'.format(DRAWS))
    assert len(plain_piece[0]) == len(stepped_piece[0]) == 8   # four layers: the support pass and the query pass
    assert len(plain_piece[1]) == len(stepped_piece[1]) == (8 if model.config.max_pool else 0)
    assert sorted(plain[0]) == sorted(stepped[0])
    for got, want in zip(tf.nest.flatten(plain), tf.nest.flatten(stepped)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_conv_biases_before_batch_norm_get_exact_zero_gradients_and_change_nothing():
    rng = np.random.RandomState(1)
    with tf.Graph().as_default():
        model, feed = build('omniglot', rng)
        biases = [model.weights[b] for b in CONV_BIASES]
        gradients = {v.op.name: g for g, v in model.gvs}
        fast_weights = model.fast_paths[0].weights_per_task(TASKS)
        assert not set(CONV_BIASES) & set(fast_weights)          # the inner loop leaves them out
        slots = {v.op.name for v in tf1.global_variables()}
        assert all(b.op.name + '/Adam' in slots and b.op.name + '/Adam_1' in slots for b in biases)
        with tf1.Session() as sess:
            sess.run(tf1.global_variables_initializer())
            randomize(sess, model, rng)
            loss, bias_gradients = sess.run([model.total_losses2[0], [gradients[b.op.name] for b in biases]], feed)
            for b in biases:
                b.load(np.zeros(b.shape, np.float32), sess)   # noqa
            loss_without_biases = sess.run(model.total_losses2[0], feed)
            before = sess.run(biases)
            sess.run(model.metatrain_op, feed)
            after = sess.run(biases)
    assert all(np.all(g == 0) for g in bias_gradients)
    assert all(np.array_equal(a, b) for a, b in zip(after, before))
    np.testing.assert_allclose(loss, loss_without_biases, rtol=1e-5)


def test_tf13_moments_give_the_conv_biases_a_meta_gradient():
    rng = np.random.RandomState(2)
    with tf.Graph().as_default():
        model, feed = build('omniglot_tf13_moments', rng)
        assert set(CONV_BIASES) <= set(model.fast_paths[0].weights_per_task(TASKS))
        gradients = {v.op.name: g for g, v in model.gvs}
        with tf1.Session() as sess:
            sess.run(tf1.global_variables_initializer())
            randomize(sess, model, rng)
            bias_gradients = sess.run([gradients[model.weights[b].op.name] for b in CONV_BIASES], feed)
    assert all(np.abs(g).max() > 1e-4 for g in bias_gradients)
