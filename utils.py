"""The network pieces and losses of the reference's utils.py, for one task's examples: normalisation,
the convolution block, the losses. fast_paths.py holds the faster versions of some of them, each
tested equal to these."""
import tensorflow as tf

tf1 = tf.compat.v1

NORMS = ('batch_norm', 'layer_norm', 'None')
BATCH_NORM_EPSILON = 1e-3    # tf.contrib.layers.batch_norm's default
LAYER_NORM_EPSILON = 1e-12   # tf.contrib.layers.layer_norm's default


## Normalisation
def make_norm_params(norm, scope, num_channels):
    """Creates the learned offset (and, for layer norm, scale) of one normalisation layer."""
    if norm == 'None':
        return {}
    with tf1.variable_scope(scope):
        params = {'beta': tf1.get_variable('beta', [num_channels], initializer=tf1.zeros_initializer())}
        if norm == 'layer_norm':
            params['gamma'] = tf1.get_variable('gamma', [num_channels], initializer=tf1.ones_initializer())
    return params


def mean_over(x, axes):
    return tf.reduce_mean(x, axes, keepdims=True)


def moments(x, axes, stop_gradient_in_variance=False, mean=mean_over):
    """Mean and variance of x over axes (dimensions kept), as tf.nn.moments computes them.

    By default as TF 1.1 and 1.2 did, the versions the reference first ran on: the variance is
    E[(x - s)^2] - (E[x - s])^2 with s the mean held constant, which equals the variance for any
    s, so its derivatives of every order are exact. With stop_gradient_in_variance, as TF 1.3 and
    later do: E[(x - s)^2] alone. Its first derivative is the same, its second is not (a term is
    missing), so the meta-gradient through batch norm differs: that is what the reference computes
    on TF 1.15 (with batch norm from moments) and what tests/golden pins.
    `mean(x, axes)`: how the means are summed (fast_paths sums in blocks).
    """
    if stop_gradient_in_variance:   # tf.nn.moments, written out
        average = mean(x, axes)
        return average, mean(tf.math.squared_difference(x, tf.stop_gradient(average)), axes)
    shift = tf.stop_gradient(mean(x, axes))
    shifted_mean = mean(x - shift, axes)
    variance = mean(tf.math.squared_difference(x, shift), axes) - tf.square(shifted_mean)
    return shifted_mean + shift, variance


def normalize(x, norm, params, stop_gradient_in_variance=False, activation=tf.nn.relu):
    """Batch norm, layer norm or nothing, then the activation; x: one task's [examples, ..., channels].

    Batch norm is transductive, as in the reference: it always uses the moments of the current
    batch (the task's examples and positions), at training and test time alike, and has an offset
    but no scale. It is written with moments rather than the fused kernel because the fused
    kernel's second derivative is wrong inside the inner loop. Layer norm normalises each example
    over its features, with an offset and a scale. stop_gradient_in_variance: see `moments`.
    """
    if norm == 'batch_norm':
        mean, variance = moments(x, list(range(x.shape.rank - 1)), stop_gradient_in_variance)
        x = tf.nn.batch_normalization(x, mean, variance, params['beta'], None, BATCH_NORM_EPSILON)
    elif norm == 'layer_norm':
        mean, variance = moments(x, list(range(1, x.shape.rank)), stop_gradient_in_variance)
        x = tf.nn.batch_normalization(x, mean, variance, params['beta'], params['gamma'], LAYER_NORM_EPSILON)
    return activation(x) if activation is not None else x


## The convolution block
def conv_block(x, kernel, bias, norm, norm_params, max_pool, stop_gradient_in_variance=False):
    """conv 3x3 (+ bias) -> normalisation -> ReLU (-> 2x2 max pool); x: one task's [examples, H, W, C].
    Without max pooling the convolution has stride 2, with it stride 1."""
    strides = [1, 1, 1, 1] if max_pool else [1, 2, 2, 1]
    x = tf.nn.conv2d(x, kernel, strides, 'SAME') + bias
    x = normalize(x, norm, norm_params, stop_gradient_in_variance)
    if max_pool:
        x = tf.nn.max_pool2d(x, [1, 2, 2, 1], [1, 2, 2, 1], 'VALID')
    return x


## Losses
def mse(pred, label):
    """Mean squared error of one task's points."""
    return tf.reduce_mean(tf.square(pred - label))


def xent(pred, label, update_batch_size):
    """Softmax cross entropy of each example divided by K.

    Dividing by K (not by N*K) is the reference's choice: the inner step size then means the
    same thing for every N, and the loss's gradient is that of its sum.
    """
    return tf.nn.softmax_cross_entropy_with_logits(labels=label, logits=pred) / update_batch_size


def accuracy(pred, label):
    """Fraction of examples whose arg max matches the label's, per task ([tasks, examples, N] -> [tasks])."""
    correct = tf.equal(tf.argmax(pred, -1), tf.argmax(label, -1))
    return tf.reduce_mean(tf.cast(correct, tf.float32), axis=1)
