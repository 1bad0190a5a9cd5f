"""Second derivatives through max pooling (MiniImagenet's second-order meta-gradient)."""
import numpy as np
import tensorflow as tf

import special_grads

tf1 = tf.compat.v1


def test_a_max_pool_grad_gradient_is_registered():
    assert special_grads.has_gradient('MaxPoolGrad')


def test_second_order_gradient_through_max_pool_matches_finite_differences():
    """d/dw of <v, d/dx sum(maxpool(x*w)^2)>, the shape of MAML's meta-gradient, vs central differences."""
    rng = np.random.RandomState(0)
    x_value = rng.randn(2, 6, 6, 3)            # float64: finite differences need the precision
    v_value = rng.randn(2, 6, 6, 3)
    w_value = rng.randn(3)
    graph = tf.Graph()
    with graph.as_default():
        w = tf1.placeholder(tf.float64, [3])
        x = tf.constant(x_value)
        pooled = tf.nn.max_pool2d(x * w, 2, 2, 'VALID')
        inner_grad = tf.gradients(tf.reduce_sum(tf.square(pooled)), x)[0]
        outer = tf.reduce_sum(inner_grad * v_value)
        second_order = tf.gradients(outer, w)[0]
        with tf1.Session() as sess:
            analytic = sess.run(second_order, {w: w_value})
            eps = 1e-6
            numeric = np.array([(sess.run(outer, {w: w_value + eps * e}) - sess.run(outer, {w: w_value - eps * e}))
                                / (2 * eps) for e in np.eye(3)])
    assert np.abs(analytic).max() > 1e-2        # the second-order path is not silently zero
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-7)
