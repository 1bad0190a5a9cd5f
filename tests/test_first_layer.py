"""The first layer's batch norm from its input's patch moments (fast_paths.conv_batch_norm_relu_from_patches)
against the convolution and batch norm it replaces, and the model built with it against the model
built without it.

Truth is autodiff of the plain convolution and batch norm (fast_paths.normalize_per_task, as
utils.normalize for each task) in float64; the patch version runs in
float32 (its grouped convolution needs oneDNN, which has no float64) and must be as accurate as
that autodiff in float32: values, and first and second derivatives in the kernel, the conv bias and
beta, in both formulations of the moments.
"""
import numpy as np
import pytest
import tensorflow as tf

import fast_paths
from fast_paths import conv_batch_norm_relu_from_patches, normalize_per_task, patch_moments
from maml import MAML, ModelConfig

tf1 = tf.compat.v1
TASKS, EXAMPLES, FILTERS = 3, 4, 8
STRIDES = [1, 2, 2, 1]
NAMES = ['y', 'd/dkernel', 'd/dbias', 'd/dbeta', 'd2/dkernel', 'd2/dbias', 'd2/dbeta']

needs_onednn = pytest.mark.skipif(not fast_paths.Capabilities.of().fused_bn_grad,
                                  reason='the patch version runs where oneDNN does')


def strokes(rng, shape):
    """Omniglot-like images: mostly 0, strokes of 1."""
    return (rng.rand(*shape) < 0.1).astype(np.float64)


def per_task_conv(x, kernel, num_tasks, strides):
    """One plain convolution per task (grouped convolution has no float64 kernel)."""
    pairs = zip(tf.split(x, num_tasks, axis=3), tf.split(kernel, num_tasks, axis=3))
    return tf.concat([tf.nn.conv2d(xt, kt, strides, 'SAME') for xt, kt in pairs], axis=3)


def conv_then_batch_norm(x, kernel, bias, beta, stop_gradient_in_variance):
    z = per_task_conv(x, kernel, TASKS, STRIDES) + bias
    per_task = tf.reshape(z, z.shape[:3].as_list() + [TASKS, FILTERS])
    y = normalize_per_task(per_task, 'batch_norm', {'beta': beta}, batch_axes=[0, 1, 2], feature_axes=None,
                           stop_gradient_in_variance=stop_gradient_in_variance)
    return tf.reshape(y, z.shape)


def from_patches(x, kernel, bias, beta, stop_gradient_in_variance):
    return conv_batch_norm_relu_from_patches(x, kernel, bias, beta, patch_moments(x, TASKS, STRIDES), STRIDES,
                                             stop_gradient_in_variance)


def derivatives(layer, dtype, stop_gradient_in_variance, seed=0):
    """y, its loss's gradients in (kernel, bias, beta), and the gradients of a function of those."""
    rng = np.random.RandomState(seed)
    values = [strokes(rng, (EXAMPLES, 28, 28, TASKS)), 0.5 * rng.randn(3, 3, 1, TASKS * FILTERS),
              0.1 * rng.randn(TASKS * FILTERS), 0.3 * rng.randn(FILTERS)]
    with tf.Graph().as_default():
        x, kernel, bias, beta = (tf.constant(v, dtype) for v in values)
        y = layer(x, kernel, bias, beta, stop_gradient_in_variance)
        weights = tf.constant(rng.randn(*y.shape.as_list()), dtype)
        # y ** 2 makes the output's gradient depend on the kernel too, as the inner loop's losses do
        first = tf.gradients(tf.reduce_sum(weights * y) + tf.reduce_sum(y ** 2), [kernel, bias, beta])
        loss2 = (sum(tf.reduce_sum(tf.constant(rng.randn(*g.shape.as_list()), dtype) * g) for g in first)
                 + tf.reduce_sum(first[0] ** 2))
        second = [s if s is not None else tf.zeros_like(v)   # the ReLU's mask: none for beta
                  for s, v in zip(tf.gradients(loss2, [kernel, bias, beta]), [kernel, bias, beta])]
        with tf1.Session() as sess:
            return [np.asarray(t, np.float64) for t in sess.run([y] + first + second)]


@needs_onednn
@pytest.mark.parametrize('stop_gradient_in_variance', [False, True])
@pytest.mark.parametrize('seed', [0, 1])
def test_values_and_two_derivatives_as_accurate_as_autodiff(stop_gradient_in_variance, seed):
    truth = derivatives(conv_then_batch_norm, tf.float64, stop_gradient_in_variance, seed)
    autodiff32 = derivatives(conv_then_batch_norm, tf.float32, stop_gradient_in_variance, seed)
    got = derivatives(from_patches, tf.float32, stop_gradient_in_variance, seed)
    gradient_scale = np.abs(truth[NAMES.index('d/dbeta')]).max()
    for name, want, slow, value in zip(NAMES, truth, autodiff32, got):
        # The bias's gradients are 0 up to rounding with the exact moments: held to the others' scale.
        scale = max(np.abs(want).max(), gradient_scale if 'bias' in name else 0.0)
        allowed = max(3 * np.abs(slow - want).max(), 1e-6 * scale)
        assert np.abs(value - want).max() <= allowed, name


@needs_onednn
def test_tf13_moments_differ_only_in_the_second_derivative():
    exact = derivatives(from_patches, tf.float32, False)
    tf13 = derivatives(from_patches, tf.float32, True)
    for name, a, b in zip(NAMES, exact, tf13):
        differs = np.abs(a - b).max() > 1e-3 * np.abs(a).max()
        assert differs == (name in ('d2/dkernel', 'd2/dbias')), name


@pytest.mark.parametrize('channels, strides', [(1, [1, 2, 2, 1]), (3, [1, 1, 1, 1]), (3, [1, 2, 2, 1])])
def test_patch_moments_give_each_channels_mean_and_variance(channels, strides):
    """For any kernel: mean = mean_patch . w, variance = w' cov w, padding included."""
    rng = np.random.RandomState(4)
    x = rng.rand(EXAMPLES, 11, 11, TASKS * channels)
    kernel = rng.randn(3, 3, channels, TASKS * FILTERS)
    with tf.Graph().as_default(), tf1.Session() as sess:
        z = per_task_conv(tf.constant(x), tf.constant(kernel), TASKS, strides)
        (mean, covariance), z = sess.run([patch_moments(tf.constant(x), TASKS, strides), z])
    w = kernel.reshape(9 * channels, TASKS, FILTERS).transpose(1, 0, 2)
    z = z.reshape(-1, TASKS, FILTERS)
    np.testing.assert_allclose(np.einsum('tk,tkf->tf', mean, w), z.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.einsum('tkf,tkl,tlf->tf', w, covariance, w), z.var(0), rtol=1e-10)


def with_capabilities(**changes):
    """A Capabilities.of that gives this machine's capabilities with `changes`."""
    real = fast_paths.Capabilities.of

    def of(device=None):
        capabilities = real(device)
        vars(capabilities).update(changes)
        return capabilities
    return of


MODEL_CONFIGS = {
    'exact': {},
    'tf13_moments': dict(moments_stop_gradient=True),
    'first_order': dict(stop_grad=True),
}
SLOW_CONFIGS = ('tf13_moments', 'first_order')


def model_outputs(enabled, extra, monkeypatch):
    """Query outputs after 3 steps and the meta-gradient through 2 (the second per task)."""
    rng = np.random.RandomState(5)
    way = 5
    with tf.Graph().as_default() as graph:
        config = ModelConfig(datasource='omniglot', num_classes=way, meta_batch_size=TASKS, update_batch_size=1,
                             update_lr=0.4, num_updates=2, num_filters=FILTERS, **extra)
        model = MAML(config, 28 * 28, way, test_num_updates=3)
        with monkeypatch.context() as patched:
            patched.setattr(fast_paths.Capabilities, 'of', with_capabilities(first_layer_from_patches=enabled))
            model.construct_model(prefix='metatrain_')
        variables = tf1.trainable_variables()
        gradients = [g for g in tf.gradients(model.total_losses2[1], variables) if g is not None]
        labels = np.tile(np.eye(way, dtype=np.float32), (TASKS, 1, 1))
        feed = {model.inputa: strokes(rng, (TASKS, way, 784)), model.inputb: strokes(rng, (TASKS, way, 784)),
                model.labela: labels, model.labelb: labels}
        with tf1.Session() as sess:
            sess.run(tf1.global_variables_initializer())
            for variable in variables:   # conv biases too, which the TF 1.3 moments differentiate
                variable.load((0.3 * rng.randn(*variable.shape.as_list())).astype(np.float32), sess)  # noqa
            values = sess.run(model.outputbs + gradients, feed)
        patch_ops = [op for op in graph.get_operations() if op.type == 'ExtractImagePatches']
    return values, len(patch_ops)


@needs_onednn
@pytest.mark.parametrize('name', [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW_CONFIGS else [])
                                  for n in MODEL_CONFIGS])
def test_model_computes_the_same_with_the_first_layer_from_patches(name, monkeypatch):
    without, patch_ops_without = model_outputs(False, MODEL_CONFIGS[name], monkeypatch)
    with_patches, patch_ops = model_outputs(True, MODEL_CONFIGS[name], monkeypatch)
    assert (patch_ops_without, patch_ops) == (0, 2)   # once per input (support and query), not per step
    assert len(with_patches) == len(without)
    for want, got in zip(without, with_patches):
        assert np.abs(got - want).max() <= 2e-5 * np.abs(want).max()
