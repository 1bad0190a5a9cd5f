"""fast_paths.batch_norm_relu_per_channel (fused gradient kernel, hand-written second derivative) and
batch_norm_relu_per_task (the same derivatives with plain reductions, tasks in the batch) against
TF's autodiff of batch norm as utils.normalize computes it, in both of its formulations: the moments of TF 1.1/1.2 (exact
derivatives, the default) and of TF 1.3 and later (stop_gradient on the mean in the variance).

Truth is autodiff in float64; the fast versions must be as accurate as autodiff in float32, for
values, first and second derivatives. The per-task version also runs in float64 (the fused kernel
has none), where it must agree with autodiff to rounding: its formulas are the same.
"""
import numpy as np
import pytest
import tensorflow as tf

import fast_paths
import utils
from fast_paths import batch_norm_relu_per_channel, batch_norm_relu_per_task, blocked_sum, normalize_per_task

tf1 = tf.compat.v1
SHAPE = (5, 6, 6, 12)   # examples, H, W, tasks * filters
PER_TASK_SHAPE = (3, 5, 6, 6, 4)   # tasks, examples, H, W, filters


def derivatives(batch_norm, x_value, beta_value, dtype):
    """y, then (dx, dbeta) of L1, then d/dx and d/dbeta of L2, a function of (dx, dbeta)."""
    rng = np.random.RandomState(1)
    with tf.Graph().as_default():
        x = tf.constant(x_value, dtype)
        beta = tf.constant(beta_value, dtype)
        w, v = (tf.constant(rng.randn(*x_value.shape), dtype) for _ in range(2))
        y = batch_norm(x, beta)
        # y ** 2 makes dy depend on x as well, as in the inner loop's losses.
        dx, dbeta = tf.gradients(tf.reduce_sum(w * y) + tf.reduce_sum(y ** 2), [x, beta])
        weight = tf.range(beta_value.shape[-1], dtype=dtype)
        loss2 = tf.reduce_sum(v * dx) + tf.reduce_sum(dx ** 2) + tf.reduce_sum(dbeta * weight)
        ddx, ddbeta = tf.gradients(loss2, [x, beta])
        with tf1.Session() as sess:
            return [np.asarray(t, np.float64) for t in sess.run([y, dx, dbeta, ddx, ddbeta])]


def autodiff(stop_gradient_in_variance, layout='per_channel', blocked_sums=False):
    """Batch norm by autodiff: utils.normalize (one task: [examples, H, W, channels]), or for several
    tasks in the batch its per-task form, fast_paths.normalize_per_task (blocked_sums: its sums in blocks)."""
    if layout == 'per_channel' and not blocked_sums:
        return lambda x, beta: utils.normalize(x, 'batch_norm', {'beta': beta}, stop_gradient_in_variance)
    axes = [0, 1, 2] if layout == 'per_channel' else [1, 2, 3]
    return lambda x, beta: normalize_per_task(x, 'batch_norm', {'beta': beta}, batch_axes=axes, feature_axes=None,
                                              stop_gradient_in_variance=stop_gradient_in_variance,
                                              blocked_sums=blocked_sums)


def fast_version(stop_gradient_in_variance, layout='per_channel', blocked_sums=False):
    function = batch_norm_relu_per_channel if layout == 'per_channel' else batch_norm_relu_per_task
    return lambda x, beta: function(x, beta, stop_gradient_in_variance, blocked_sums)


def inputs(layout, contrast, rng):
    shape = SHAPE if layout == 'per_channel' else PER_TASK_SHAPE
    if contrast == 'normal':
        x = rng.randn(*shape)
    else:   # Omniglot's first layer: a large common level, tiny variations (variance << epsilon)
        x = 0.5 + 1e-3 * rng.randn(*shape)
    return x, 0.3 * rng.randn(shape[-1])


def exact(x, beta):
    """Batch norm written plainly, no stop_gradient anywhere: the exact derivatives."""
    mean = tf.reduce_mean(x, [0, 1, 2])
    variance = tf.reduce_mean(tf.square(x - mean), [0, 1, 2])
    return tf.nn.relu((x - mean) * tf.math.rsqrt(variance + 1e-3) + beta)


@pytest.mark.parametrize('blocked_sums', [False, True])
@pytest.mark.parametrize('layout', ['per_channel', 'per_task'])
@pytest.mark.parametrize('stop_gradient_in_variance', [False, True])
@pytest.mark.parametrize('contrast', ['normal', 'low'])
def test_values_and_two_derivatives_as_accurate_as_autodiff(contrast, stop_gradient_in_variance, layout, blocked_sums,
                                                            monkeypatch):
    """blocked_sums: both sides sum as fast_paths.blocked_sum does (CPU with oneDNN; here at any size), so
    their moments round alike; test_blocked_sum_* check those sums against tf.reduce_sum's."""
    monkeypatch.setattr(fast_paths, 'MIN_BLOCKED_ELEMENTS', 0)
    x, beta = inputs(layout, contrast, np.random.RandomState(0))
    truth = derivatives(autodiff(stop_gradient_in_variance, layout), x, beta, tf.float64)
    autodiff32 = derivatives(autodiff(stop_gradient_in_variance, layout, blocked_sums), x, beta, tf.float32)
    fast = derivatives(fast_version(stop_gradient_in_variance, layout, blocked_sums), x, beta, tf.float32)
    for name, want, slow, got in zip(['y', 'dx', 'dbeta', 'd2/dx', 'd2/dbeta'], truth, autodiff32, fast):
        scale = np.abs(want).max()
        # Low contrast, 8x: the fast version takes its moments as tf.nn.moments does, so there its
        # errors are those of TF >= 1.3's float32 autodiff (about 1e-5 of the scale), and the exact
        # formulation's autodiff is the more accurate by 1-4x, depending on the CPU (4.15x for
        # d2/dbeta on an AVX-512 Xeon). A wrong derivative is off by far more than either.
        factor = 4 if contrast == 'normal' else 8
        allowed = max(factor * np.abs(slow - want).max(), 1e-6 * scale)
        assert np.abs(got - want).max() <= allowed, name


def test_tf12_moments_give_the_exact_second_derivative_and_tf13_moments_do_not():
    # TF 1.3's tf.nn.moments stops the gradient through the mean inside the variance: its second
    # derivative misses a term (what the golden cases pin). TF 1.1/1.2's form is exact.
    rng = np.random.RandomState(2)
    x, beta = rng.randn(*SHAPE), 0.3 * rng.randn(SHAPE[-1])
    exact_second = derivatives(exact, x, beta, tf.float64)[3]
    tf12 = derivatives(autodiff(False), x, beta, tf.float64)[3]
    tf13 = derivatives(autodiff(True), x, beta, tf.float64)[3]
    scale = np.abs(exact_second).max()
    assert np.abs(tf12 - exact_second).max() < 1e-9 * scale
    assert np.abs(tf13 - exact_second).max() > 1e-2 * scale
    for stop_gradient_in_variance, want in ((False, exact_second), (True, tf13)):
        fast = derivatives(fast_version(stop_gradient_in_variance), x, beta, tf.float32)[3]
        assert np.abs(fast - want).max() < 1e-4 * scale


@pytest.mark.parametrize('stop_gradient_in_variance', [False, True])
def test_per_task_version_in_float64_is_autodiff_to_rounding(stop_gradient_in_variance):
    x, beta = inputs('per_task', 'normal', np.random.RandomState(3))
    truth = derivatives(autodiff(stop_gradient_in_variance, 'per_task'), x, beta, tf.float64)
    got = derivatives(fast_version(stop_gradient_in_variance, 'per_task'), x, beta, tf.float64)
    for name, want, value in zip(['y', 'dx', 'dbeta', 'd2/dx', 'd2/dbeta'], truth, got):
        assert np.abs(value - want).max() <= 1e-10 * max(np.abs(want).max(), 1.0), name


@pytest.mark.parametrize('layout', ['per_channel', 'per_task'])
@pytest.mark.parametrize('stop_gradient_in_variance', [False, True])
def test_blocked_sums_change_only_rounding(stop_gradient_in_variance, layout, monkeypatch):
    """In float64, where rounding is negligible, batch norm with blocked sums (and with
    fast_paths.channel_affine in autodiff's) has the values and derivatives of the plain one."""
    monkeypatch.setattr(fast_paths, 'MIN_BLOCKED_ELEMENTS', 0)
    x, beta = inputs(layout, 'normal', np.random.RandomState(6))
    versions = [autodiff] + ([fast_version] if layout == 'per_task' else [])   # the fused kernel has no float64
    for version in versions:
        want = derivatives(version(stop_gradient_in_variance, layout), x, beta, tf.float64)
        got = derivatives(version(stop_gradient_in_variance, layout, blocked_sums=True), x, beta, tf.float64)
        for name, expected, value in zip(['y', 'dx', 'dbeta', 'd2/dx', 'd2/dbeta'], want, got):
            assert np.abs(value - expected).max() <= 1e-10 * max(np.abs(expected).max(), 1.0), (version, name)


BLOCKED_SUM_CASES = [   # (shape, axes, placeholder shape, summed in blocks?), with any number of elements
    ((4, 5, 14, 14, 8), [1, 2, 3], (4, None, 14, 14, 8), True),   # per task, examples unknown
    ((20, 14, 14, 16), [0, 1, 2], (None, 14, 14, 16), True),      # per channel, examples unknown
    ((3, 5, 6, 6, 4), [1, 2, 3], (None, 5, 6, 6, 4), True),       # tasks unknown
    ((5, 2, 2, 4, 8), [0, 1, 2], (5, 2, 2, 4, 8), True),          # tasks and filters kept after the sum
    ((5, 6, 6, 12), [0, 2], (5, 6, 6, 12), False),                # not consecutive: tf.reduce_sum
    ((7, 1, 1, 3), [0, 1, 2], (7, 1, 1, 3), False),               # 7 values: too few for a block
]
SMALL = ((20, 14, 14, 16), [0, 1, 2], (20, 14, 14, 16), False)   # all known and under MIN_BLOCKED_ELEMENTS


@pytest.mark.parametrize('case', [(c, 0) for c in BLOCKED_SUM_CASES] + [(SMALL, None)])
def test_blocked_sum_is_reduce_sum(case):
    (shape, axes, placeholder_shape, blocked), min_elements = case
    x = np.random.RandomState(4).randn(*shape)
    kwargs = {} if min_elements is None else {'min_elements': min_elements}
    with tf.Graph().as_default() as graph:
        placeholder = tf1.placeholder(tf.float64, placeholder_shape)
        got, want = blocked_sum(placeholder, axes, **kwargs), tf.reduce_sum(placeholder, axes, keepdims=True)
        used_products = any(op.type.startswith('BatchMatMul') for op in graph.get_operations())
        with tf1.Session() as sess:
            got, want = sess.run([got, want], {placeholder: x})
    assert used_products == blocked
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-12 * np.abs(x).sum()


@pytest.mark.parametrize('contrast', ['normal', 'low'])
def test_blocked_sum_at_least_as_accurate_as_reduce_sum(contrast):
    """In float32, on a 20-way tower's first-layer activations (20 examples, 14x14, 8 tasks x 64)."""
    rng = np.random.RandomState(5)
    shape = (20, 14, 14, 512)
    x = (rng.randn(*shape) if contrast == 'normal' else 0.5 + 1e-3 * rng.randn(*shape)).astype(np.float32)
    truth = x.astype(np.float64).sum((0, 1, 2), keepdims=True)
    with tf.Graph().as_default(), tf1.Session() as sess:
        blocked, plain = sess.run([blocked_sum(tf.constant(x), [0, 1, 2]),
                                   tf.reduce_sum(tf.constant(x), [0, 1, 2], keepdims=True)])
    assert np.abs(blocked - truth).max() <= np.abs(plain - truth).max()


def blocked_sum_products(graph):
    """blocked_sum's matrix products (a row of ones times the blocks) in `graph`."""
    return [op for op in graph.get_operations()
            if op.type.startswith('BatchMatMul') and op.inputs[0].op.name.split('/')[-1].startswith('ones')]


def test_model_sums_batch_norm_in_blocks_where_supported():
    """With --fast_paths=auto the model sums batch norm in blocks where Capabilities say so (CPU with
    oneDNN, as main.py runs image data on x86); with off (the plain definition), nowhere."""
    from maml import MAML, ModelConfig
    if not fast_paths.Capabilities.of().blocked_sums:
        pytest.skip('blocked sums run where oneDNN does; main.py leaves oneDNN to TensorFlow on this CPU')
    counts = []
    for path in ('auto', 'off'):
        config = ModelConfig(datasource='omniglot', num_classes=5, meta_batch_size=2, update_batch_size=1,
                             num_updates=1, fast_paths=path)
        with tf.Graph().as_default() as graph:
            model = MAML(config, 784, 5, test_num_updates=1)
            inputs = {k: tf1.placeholder(tf.float32, [2, None, 784 if k.startswith('input') else 5])
                      for k in ('inputa', 'inputb', 'labela', 'labelb')}
            model.construct_model(inputs)
            counts.append(len(blocked_sum_products(graph)))
    assert counts[0] >= 8 and counts[1] == 0, counts


@pytest.mark.parametrize('stop_gradient_in_variance', [False, True])
def test_per_channel_version_takes_one_beta_for_every_task(stop_gradient_in_variance):
    """Tasks side by side in the channels share beta [F]: the values and derivatives (beta's summed
    over the tasks) of beta tiled to every task's channels, through TF's gradient of tf.tile. The
    fused gradient kernel is float32 only; the same sums in the same order give equal numbers."""
    tasks, features = 4, SHAPE[-1] // 4
    x, _ = inputs('per_channel', 'normal', np.random.RandomState(4))
    beta = 0.3 * np.random.RandomState(5).randn(features)
    fast = fast_version(stop_gradient_in_variance)
    tiled = derivatives(lambda x, beta: fast(x, tf.tile(beta, [tasks])), x, beta, tf.float32)
    shared = derivatives(fast, x, beta, tf.float32)
    for name, want, value in zip(['y', 'dx', 'dbeta', 'd2/dx', 'd2/dbeta'], tiled, shared):
        assert value.shape == want.shape, name
        np.testing.assert_allclose(value, want, rtol=1e-6, atol=1e-6 * np.abs(want).max(), err_msg=name)
