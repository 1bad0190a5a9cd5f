"""The first inner step from the shared weights (plain convolutions over all tasks' examples, each
task's kernel gradient from a probe) against the per-task step it replaces; the conv biases that
batch norm cancels."""
import numpy as np
import pytest
import tensorflow as tf

from maml import CONV_BIASES, MAML, ModelConfig

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


def build(name, rng):
    """The model of CONFIGS[name] (8 filters) with random weights (conv biases too), and a feed."""
    fields = dict(num_classes=WAY, meta_batch_size=TASKS, update_batch_size=1, update_lr=0.1, num_updates=1,
                  num_filters=8, **CONFIGS[name])
    config = ModelConfig(**fields)
    size = 84 * 84 * 3 if config.datasource == 'miniimagenet' else 28 * 28
    model = MAML(config, size, WAY, test_num_updates=1)
    model.construct_model(prefix='metatrain_')
    labels = np.tile(np.eye(WAY, dtype=np.float32), (TASKS, 1, 1))
    feed = {model.inputa: rng.rand(TASKS, WAY, size), model.inputb: rng.rand(TASKS, WAY, size),
            model.labela: labels, model.labelb: labels}
    return model, feed


def randomize(sess, model, rng):
    for variable in tf1.trainable_variables():
        shape = variable.shape.as_list()
        variable.load((0.3 * rng.randn(*shape)).astype(np.float32), sess)   # noqa


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_first_step_from_shared_weights_is_the_per_task_step(name):
    rng = np.random.RandomState(0)
    with tf.Graph().as_default():
        model, feed = build(name, rng)
        inputs = (model.inputa, model.labela, model.inputb, model.labelb)
        results = []
        for from_shared in (True, False):
            fast_weights, outputb, lossb = model._inner_step(*inputs, model.weights_per_task(TASKS),   # noqa: SLF001
                                                             from_shared_weights=from_shared)
            meta_gradient = tf.gradients(tf.reduce_sum(lossb), tf1.trainable_variables())
            results.append([fast_weights, outputb, [g for g in meta_gradient if g is not None]])
        with tf1.Session() as sess:
            sess.run(tf1.global_variables_initializer())
            randomize(sess, model, rng)
            plain, per_task = sess.run(results, feed)
    assert sorted(plain[0]) == sorted(per_task[0])
    for got, want in zip(tf.nest.flatten(plain), tf.nest.flatten(per_task)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_conv_biases_before_batch_norm_get_exact_zero_gradients_and_change_nothing():
    rng = np.random.RandomState(1)
    with tf.Graph().as_default():
        model, feed = build('omniglot', rng)
        biases = [model.weights[b] for b in CONV_BIASES]
        gradients = {v.op.name: g for g, v in model.gvs}
        fast_weights = model.weights_per_task(TASKS)
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
        assert set(CONV_BIASES) <= set(model.weights_per_task(TASKS))
        gradients = {v.op.name: g for g, v in model.gvs}
        with tf1.Session() as sess:
            sess.run(tf1.global_variables_initializer())
            randomize(sess, model, rng)
            bias_gradients = sess.run([gradients[model.weights[b].op.name] for b in CONV_BIASES], feed)
    assert all(np.abs(g).max() > 1e-4 for g in bias_gradients)
