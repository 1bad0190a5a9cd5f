"""Stand-ins for the two `tf.contrib.layers` norms the reference calls, with batch norm computed from
tf.nn.moments instead of the fused kernel: what contrib's batch_norm computed when the paper was
written (and what the port computes), for `python bench/reference.py --moments`.

Same variables as contrib's (beta, and the moving statistics, created but never used: the reference
always normalises with the batch's own moments), offset only, epsilon 1e-3; layer norm with offset and
scale, epsilon 1e-12. Runs on TensorFlow 1.15 (the reference's venv) and 2.x alike.
"""
try:
    import tensorflow.compat.v1 as tf
except ImportError:   # TensorFlow before 1.13
    import tensorflow as tf

BATCH_NORM_EPSILON, LAYER_NORM_EPSILON = 1e-3, 1e-12


def _normalised(inputs, axes, scale, offset, epsilon, activation_fn):
    mean, variance = tf.nn.moments(inputs, axes, keep_dims=True)
    outputs = tf.nn.batch_normalization(inputs, mean, variance, offset, scale, epsilon)
    return outputs if activation_fn is None else activation_fn(outputs)


def batch_norm(inputs, activation_fn=None, reuse=None, scope=None):
    inputs = tf.convert_to_tensor(inputs)
    channels = inputs.get_shape().as_list()[-1]
    with tf.variable_scope(scope, 'BatchNorm', [inputs], reuse=reuse):
        beta = tf.get_variable('beta', [channels], initializer=tf.zeros_initializer())
        for name, init in (('moving_mean', tf.zeros_initializer()), ('moving_variance', tf.ones_initializer())):
            tf.get_variable(name, [channels], initializer=init, trainable=False)
        axes = list(range(inputs.get_shape().ndims - 1))
        return _normalised(inputs, axes, None, beta, BATCH_NORM_EPSILON, activation_fn)


def layer_norm(inputs, activation_fn=None, reuse=None, scope=None):
    inputs = tf.convert_to_tensor(inputs)
    channels = inputs.get_shape().as_list()[-1:]
    with tf.variable_scope(scope, 'LayerNorm', [inputs], reuse=reuse):
        beta = tf.get_variable('beta', channels, initializer=tf.zeros_initializer())
        gamma = tf.get_variable('gamma', channels, initializer=tf.ones_initializer())
        axes = list(range(1, inputs.get_shape().ndims))
        return _normalised(inputs, axes, gamma, beta, LAYER_NORM_EPSILON, activation_fn)
