"""Network pieces, losses, experiment naming and checkpoint bookkeeping shared by the MAML code.

Every network function here works on a whole meta-batch at once: the leading axis of an
activation or of a fast weight is the task. That replaces the reference's `tf.map_fn` over
tasks, so TensorFlow prunes inner steps that nothing fetched and loops over tasks no more.
"""
import fcntl
import os
import re
import socket
import time

import numpy as np
import tensorflow as tf

tf1 = tf.compat.v1

NORMS = ('batch_norm', 'layer_norm', 'None')
BATCH_NORM_EPSILON = 1e-3    # tf.contrib.layers.batch_norm's default
LAYER_NORM_EPSILON = 1e-12   # tf.contrib.layers.layer_norm's default


class UserError(Exception):
    """Bad input from the user: main.py prints the message as one line and exits non-zero."""


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


## Sums over a channel's values
MIN_BLOCKED_ELEMENTS = 1 << 18   # the sizes where blocked_sum and tf.reduce_sum took about as long


def _block_size(count, largest=128, smallest=8):
    """The largest divisor of `count` up to `largest`; None if that is below `smallest`."""
    block = max(k for k in range(1, min(count, largest) + 1) if count % k == 0)
    return block if block >= smallest else None


def blocked_sum(x, axes, min_elements=None):
    """tf.reduce_sum(x, axes, keepdims=True) for consecutive `axes`, as sums of blocks of up to 128
    values (a batched product with a row of ones) and then a sum of the blocks' sums.

    On one thread (a CPU tower) TF's reduction over leading axes, each channel's values spread over
    every row, streams at a quarter of memory speed with oneDNN on: 2.1 ms for [20, 14, 14, 512]
    (Omniglot 20-way's first layer) against 0.49 ms this way, 41 against 6.3 ms for [75, 84, 84,
    64]; and the float32 error is smaller (two short sums, not one long one). Below about
    `min_elements` values (default MIN_BLOCKED_ELEMENTS) the three operations cost more than they
    save: x smaller than that (all its dimensions known), any other pattern of axes, or too few
    values to block falls back to tf.reduce_sum. A dimension unknown when the graph is built counts
    as large.
    """
    min_elements = MIN_BLOCKED_ELEMENTS if min_elements is None else min_elements
    shape = x.shape.as_list()
    axes = sorted(a % len(shape) for a in axes)
    trail = shape[axes[-1] + 1:]
    known = [shape[a] for a in axes if shape[a] is not None]
    block = _block_size(int(np.prod(known, dtype=np.int64))) if known else None
    small = None not in shape and np.prod(shape, dtype=np.int64) < min_elements
    if axes != list(range(axes[0], axes[-1] + 1)) or None in trail or block is None or small:
        return tf.reduce_sum(x, axes, keepdims=True)
    trail = int(np.prod(trail, dtype=np.int64))
    dims = [d if d is not None else tf.shape(x)[i] for i, d in enumerate(shape)]
    # The reduced axes are consecutive, so any split of them into (blocks, block) is a free reshape.
    block_sums = tf.matmul(tf.ones([1, block], x.dtype), tf.reshape(x, [-1, block, trail]))
    lead = tf.reduce_prod(tf.shape(x)[:axes[0]]) if None in shape[:axes[0]] else int(np.prod(shape[:axes[0]]))
    total = tf.reduce_sum(tf.reshape(block_sums, [lead, -1, trail]), 1)
    return tf.reshape(total, [1 if i in axes else d for i, d in enumerate(dims)])


def _sum(x, axes, blocked_sums):
    return blocked_sum(x, axes) if blocked_sums else tf.reduce_sum(x, axes, keepdims=True)


def _mean(x, axes, blocked_sums):
    return blocked_sum(x, axes) / _count(x, axes) if blocked_sums else tf.reduce_mean(x, axes, keepdims=True)


def channel_affine(x, scale, offset, axes):
    """x * scale + offset (offset None: none), scale and offset shaped as x but 1 along `axes`, with
    derivatives of every order whose sums over `axes` are blocked_sum's, where autodiff's would be
    tf.reduce_sum's."""
    def scaled_gradient(dy):
        return channel_affine(dy, scale, None, axes)

    if offset is None:
        @tf.custom_gradient
        def scaled(x, scale):
            return x * scale, lambda dy: (scaled_gradient(dy), blocked_sum(dy * x, axes))
        return scaled(x, scale)

    @tf.custom_gradient
    def affine(x, scale, offset):
        return x * scale + offset, lambda dy: (scaled_gradient(dy), blocked_sum(dy * x, axes), blocked_sum(dy, axes))
    return affine(x, scale, offset)


def blocked_sums_supported(device=None):
    """Where blocked_sum replaces TF's reductions in batch norm: CPUs with oneDNN, where it was
    measured (one thread per tower). Not without oneDNN: unmeasured there, and the golden
    first-order case then lands on the other side of a ReLU near-tie (an input of 1e-6 at its third
    meta-step), which moves its weights after three Adam steps 27 times their tolerance."""
    return fused_bn_grad_supported(device)


def moments(x, axes, stop_gradient_in_variance=False, blocked_sums=False):
    """Mean and variance of x over axes (dimensions kept), as tf.nn.moments computes them.

    By default as TF 1.1 and 1.2 did, the versions the reference first ran on: the variance is
    E[(x - s)^2] - (E[x - s])^2 with s the mean held constant, which equals the variance for any
    s, so its derivatives of every order are exact. With stop_gradient_in_variance, as TF 1.3 and
    later do: E[(x - s)^2] alone. Its first derivative is the same, its second is not (a term is
    missing), so the meta-gradient through batch norm differs: that is what the reference computes
    on TF 1.15 (with batch norm from moments) and what tests/golden pins.
    blocked_sums: the means from blocked_sum (the same values, rounded differently) instead of
    tf.reduce_mean.
    """
    if stop_gradient_in_variance:   # tf.nn.moments, written out
        mean = _mean(x, axes, blocked_sums)
        return mean, _mean(tf.math.squared_difference(x, tf.stop_gradient(mean)), axes, blocked_sums)
    shift = tf.stop_gradient(_mean(x, axes, blocked_sums))
    shifted_mean = _mean(x - shift, axes, blocked_sums)
    variance = _mean(tf.math.squared_difference(x, shift), axes, blocked_sums) - tf.square(shifted_mean)
    return shifted_mean + shift, variance


def normalize(x, norm, params, batch_axes, feature_axes, activation=tf.nn.relu, stop_gradient_in_variance=False,
              blocked_sums=False):
    """Batch norm, layer norm or nothing, then the activation.

    Batch norm is transductive, as in the reference: it always uses the moments of the current
    batch (over `batch_axes`: one task's examples and spatial positions), at training and test
    time alike, and has an offset but no scale. It is written with moments rather than the fused
    kernel because the fused kernel's second derivative is wrong inside the inner loop.
    Layer norm normalises each example over `feature_axes` with an offset and a scale.
    stop_gradient_in_variance, blocked_sums (batch norm's): see `moments`.
    """
    if norm == 'batch_norm':
        mean, variance = moments(x, batch_axes, stop_gradient_in_variance, blocked_sums)
        if blocked_sums:   # tf.nn.batch_normalization's arithmetic, its gradient's sums blocked
            inv = tf.math.rsqrt(variance + BATCH_NORM_EPSILON)
            x = channel_affine(x, inv, params['beta'] - mean * inv, batch_axes)
        else:
            x = tf.nn.batch_normalization(x, mean, variance, params['beta'], None, BATCH_NORM_EPSILON)
    elif norm == 'layer_norm':
        mean, variance = moments(x, feature_axes, stop_gradient_in_variance)
        x = tf.nn.batch_normalization(x, mean, variance, params['beta'], params['gamma'],
                                      LAYER_NORM_EPSILON)
    return activation(x) if activation is not None else x


def batch_norm_relu_per_channel(x, beta, stop_gradient_in_variance=False, blocked_sums=False):
    """relu(batch norm of x [N, H, W, C] over N, H, W, + beta): the per-task layers' norm. beta: [C],
    or [F] shared by the tasks when C = tasks * F (tasks side by side in the channels).

    The values are those of `normalize` (tf.nn.moments, tf.nn.batch_normalization, relu). The
    fused forward kernel (FusedBatchNormV3) also passes the golden cases on the real 0/1 Omniglot
    pixels, but measured no faster per meta-update with oneDNN on, so it is not used. The
    gradient uses the fused gradient kernel, and its own gradient (the inner loop is
    differentiated) is written out by hand; both equal TF's autodiff of `normalize`,
    which builds several times as many full-size elementwise passes (fused_bn_grad_supported
    says where it is used).
    """
    ones = tf.ones([x.shape[-1]], x.dtype)

    def fused_gradient(x, dz, mean, variance):
        return tf.raw_ops.FusedBatchNormGradV3(
            y_backprop=dz, x=x, scale=ones, reserve_space_1=tf.reshape(mean, [-1]),
            reserve_space_2=tf.reshape(variance, [-1]),
            reserve_space_3=tf.zeros([0]), epsilon=BATCH_NORM_EPSILON, is_training=True)[:3]
    return _batch_norm_relu(x, beta, [0, 1, 2], fused_gradient, stop_gradient_in_variance, blocked_sums)


def batch_norm_relu_per_task(x, beta, stop_gradient_in_variance=False, blocked_sums=False):
    """relu(batch norm of x [tasks, examples, H, W, F] over each task's examples and positions, +
    beta [F]): the norm of the first inner step's support pass, whose layout (tasks in the batch)
    has no fused kernel. Values as `normalize`'s; derivatives written out as in
    batch_norm_relu_per_channel, with plain reductions in place of the fused gradient kernel."""
    axes = [1, 2, 3]

    def gradient(x, dz, mean, variance):
        inv = tf.math.rsqrt(variance + BATCH_NORM_EPSILON)
        xhat = (x - mean) * inv
        sum_dz = _sum(dz, axes, blocked_sums)
        sum_dz_xhat = _sum(dz * xhat, axes, blocked_sums)
        count = _count(x, axes)
        return inv * (dz - sum_dz / count - xhat * (sum_dz_xhat / count)), sum_dz_xhat, sum_dz
    return _batch_norm_relu(x, beta, axes, gradient, stop_gradient_in_variance, blocked_sums)


def _count(x, axes):
    """How many values each sum over `axes` adds up, as a scalar of x's type: a constant where
    those dimensions are known (a dynamic count costs about 17 graph operations, built hundreds
    of times per meta-update)."""
    known = [x.shape[a] for a in axes]
    if None not in known:
        return tf.constant(float(np.prod(known, dtype=np.int64)), x.dtype)
    return tf.cast(tf.reduce_prod([tf.shape(x)[a] for a in axes]), x.dtype)


def _batch_norm_relu(x, beta, axes, first_gradient, stop_gradient_in_variance, blocked_sums):
    """relu(batch norm of x over `axes` + beta), its gradient and that gradient's gradient.

    first_gradient(x, dz, mean, variance) -> (dx, sum(dz * xhat), sum(dz)) of z = xhat + beta,
    the sums over `axes` with the dimensions kept. beta: one per channel of x, or one set shared by
    the tasks side by side in x's channels.
    """
    channels, features = x.shape[-1], beta.shape[-1]
    if channels is None or features is None or channels % features:
        raise ValueError('batch norm: {} channels are not tasks side by side with {} features each'.format(
            channels, features))

    @tf.custom_gradient
    def forward(x, beta):
        # tf.nn.moments' values (either formulation has them); the derivatives are grad's below
        mean, variance = moments(x, axes, stop_gradient_in_variance=True, blocked_sums=blocked_sums)
        offset = beta if features == channels else tf.tile(beta, [channels // features])
        y = tf.nn.relu(tf.nn.batch_normalization(x, mean, variance, offset, None, BATCH_NORM_EPSILON))

        def grad(dy):
            dx, sum_g = _batch_norm_relu_backward(dy, x, beta, y, mean, variance, axes, first_gradient,
                                                  stop_gradient_in_variance, blocked_sums)
            # sum_g: per channel, with the dimensions of x; beta's gradient sums the tasks (a tiled
            # beta's as TF's gradient of tf.tile would: without its dozen operations per layer)
            return dx, tf.reduce_sum(tf.reshape(sum_g, [-1, features]), 0)
        return y, grad
    return forward(x, beta)


def _batch_norm_relu_backward(dy, x, beta, y, mean, variance, axes, first_gradient, stop_gradient_in_variance,
                              blocked_sums):
    """(dx, dbeta per channel) of _batch_norm_relu, with its own gradient.

    With g = dy * relu'(z), a = mean(g), b = mean(g * xhat) per channel:
    dx = inv * (g - a - b * xhat). Its derivative is that of TF's autodiff of `moments`: exact, or
    with stop_gradient_in_variance lacking the term inv^2 * b * mean(h) (TF 1.3 and later).
    """
    count = _count(x, axes)

    @tf.custom_gradient
    def backward(dy, x, beta):
        g = tf.raw_ops.ReluGrad(gradients=dy, features=y)
        dx, sum_g_xhat, sum_g = first_gradient(x, g, mean, variance)

        def grad(h, h_beta):
            inv = tf.math.rsqrt(variance + BATCH_NORM_EPSILON)
            a, b = sum_g / count, sum_g_xhat / count
            d_g, sum_h_xhat, sum_h = first_gradient(x, h, mean, variance)   # d_g = inv * (h - mean_h - c * xhat)
            c, mean_h = sum_h_xhat / count, sum_h / count
            mean_hg = _sum(h * g, axes, blocked_sums) / count
            xhat = (x - mean) * inv
            inv2 = tf.square(inv)
            per_channel = c * a if stop_gradient_in_variance else c * a + b * mean_h   # exact: + b * mean_h
            d_x = (xhat * (inv2 * (3.0 * b * c - mean_hg + a * mean_h)) + inv2 * per_channel
                   - g * (inv2 * c) - h * (inv2 * b))
            # The ReLU's mask is piecewise constant: beta gets no second-order gradient.
            return tf.raw_ops.ReluGrad(gradients=d_g + h_beta, features=y), d_x, tf.zeros_like(beta)
        return (dx, sum_g), grad
    return backward(dy, x, beta)


## Convolutions with one kernel per task
def to_task_channels(images):
    """[tasks, examples, H, W, C] -> [examples, H, W, tasks*C], the layout of grouped convolution."""
    tasks, _, height, width, channels = images.shape
    x = tf.transpose(images, [1, 2, 3, 0, 4])
    return tf.reshape(x, [-1, height, width, tasks * channels])


def from_task_channels(x, num_tasks):
    """[examples, H, W, tasks*F] -> [tasks*examples, H, W, F], the tasks in the batch."""
    _, height, width, channels = x.shape
    x = tf.transpose(tf.reshape(x, [-1, height, width, num_tasks, channels // num_tasks]), [3, 0, 1, 2, 4])
    return tf.reshape(x, [-1, height, width, channels // num_tasks])


def split_task_channels(x, num_tasks):
    """[examples, H, W, tasks*F] -> [examples, H, W, tasks, F] (a free reshape)."""
    _, height, width, channels = x.shape
    return tf.reshape(x, [-1, height, width, num_tasks, channels // num_tasks])


def _onednn_enabled():
    try:
        from tensorflow.python.util import _pywrap_util_port
        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return False


def _is_gpu(device):
    return device is not None and tf1.DeviceSpec.from_string(device).device_type in ('GPU', 'gpu')


def grouped_conv_supported(device=None):
    """Grouped convolution runs on GPUs and, on CPUs, only with oneDNN (TF's x86 default on newer
    CPUs). `device`: where the convolutions are placed; None: TF's default placement here."""
    if device is not None:
        return _is_gpu(device) or _onednn_enabled()
    return bool(tf.config.list_physical_devices('GPU')) or _onednn_enabled()


def fused_bn_grad_supported(device=None):
    """Where batch_norm_relu_per_channel is used: CPUs with oneDNN, where it matches the golden
    cases. The GPUs' fused gradient kernel expects cuDNN's saved inverse variance instead, and
    TF's own CPU kernel rounds differently enough to move the ill-conditioned inner steps past
    num_updates out of their golden tolerances."""
    if device is not None:
        return not _is_gpu(device) and _onednn_enabled()
    return not tf.config.list_physical_devices('GPU') and _onednn_enabled()


def conv_per_task(x, kernel, num_tasks, strides, grouped):
    """Convolves each task's channels of x [examples, H, W, tasks*C] with that task's kernel.

    `kernel` [3, 3, C, tasks*F] holds the tasks' kernels side by side, the layout of a grouped
    convolution (input channels = tasks * kernel input channels), which does all tasks at once.
    Without grouped convolution (CPU without oneDNN) each task gets its own convolution.
    """
    if grouped or num_tasks == 1:
        return tf.nn.conv2d(x, kernel, strides, 'SAME')
    inputs, kernels = tf.split(x, num_tasks, axis=3), tf.split(kernel, num_tasks, axis=3)
    return tf.concat([tf.nn.conv2d(i, k, strides, 'SAME') for i, k in zip(inputs, kernels)], axis=3)


def per_task_kernel_gradient_probe(z, x, num_tasks, strides, grouped=True):
    """(z, probe): z = conv(x, kernel shared by every task) passed through unchanged, and a zero
    tensor [3, 3, C, tasks*F] whose gradient is each task's own gradient of that kernel.

    x, z: [tasks*examples, H, W, channels], tasks in the batch (plain convolutions). Where every
    task starts from the same kernel, the convolution and its input gradient run as one plain
    convolution (oneDNN runs those 1.6x faster than grouped ones, and reorders a kernel a task's
    size instead of one per task); only the filter gradient is per task: grouped, after moving the
    tasks into the channels, or one filter gradient per task without grouped convolution.
    """
    kernel_shape = [3, 3, x.shape[-1], num_tasks * z.shape[-1]]
    probe = tf.zeros(kernel_shape, z.dtype)

    @tf.custom_gradient
    def passthrough(z, x, probe):
        def grad(dz):
            if grouped:
                per_task = lambda t: to_task_channels(tf.reshape(t, [num_tasks, -1] + t.shape[1:].as_list()))
                d_kernel = tf1.nn.conv2d_backprop_filter(per_task(x), kernel_shape, per_task(dz), strides, 'SAME')
            else:
                d_kernel = tf.concat([tf1.nn.conv2d_backprop_filter(xt, kernel_shape[:3] + [z.shape[-1]], dzt,
                                                                    strides, 'SAME')
                                      for xt, dzt in zip(tf.split(x, num_tasks), tf.split(dz, num_tasks))], axis=3)
            return dz, None, d_kernel
        return tf.identity(z), grad
    return passthrough(z, x, probe), probe


def conv_block(x, kernel, bias, num_tasks, norm, norm_params, max_pool, grouped=True, fused_bn_grad=False,
               stop_gradient_in_variance=False, blocked_sums=False):
    """conv (+bias) -> normalisation -> ReLU (-> 2x2 max pool), every task with its own kernel.

    x: [examples, H, W, tasks*C]; kernel: [3, 3, C, tasks*F]; bias: [tasks*F], or None (no bias).
    stop_gradient_in_variance, blocked_sums: see `moments`.
    """
    strides = [1, 1, 1, 1] if max_pool else [1, 2, 2, 1]
    x = conv_per_task(x, kernel, num_tasks, strides, grouped)
    if bias is not None:
        x = x + bias
    # Not before max pooling (MiniImagenet): there it measured no faster per meta-update (its
    # 15-per-class query pass dominates), though its values are as good as autodiff's.
    if norm == 'batch_norm' and fused_bn_grad and not max_pool:
        # Each channel of x is one task's filter: per-channel statistics are per-task ones.
        x = batch_norm_relu_per_channel(x, norm_params['beta'], stop_gradient_in_variance,
                                        blocked_sums)
    else:
        per_task = split_task_channels(x, num_tasks)
        per_task = normalize(per_task, norm, norm_params, batch_axes=[0, 1, 2], feature_axes=[1, 2, 4],
                             stop_gradient_in_variance=stop_gradient_in_variance, blocked_sums=blocked_sums)
        x = tf.reshape(per_task, [-1, x.shape[1], x.shape[2], x.shape[3]])
    if max_pool:
        x = tf.nn.max_pool2d(x, [1, 2, 2, 1], [1, 2, 2, 1], 'VALID')
    return x


## The first layer's batch norm from its input's patches
def patch_moments(images, num_tasks, strides):
    """(mean [tasks, 9C], covariance [tasks, 9C, 9C]) of each task's 3x3xC patches as a 'SAME'
    convolution with `strides` sees them, in float64; images [examples, H, W, tasks*C], tasks side
    by side in the channels.

    A convolution is linear in its patches, so from these the first layer's batch-norm moments for
    any kernel are products of a few hundred numbers (conv_batch_norm_relu_from_patches). The
    images need no gradient: computed once per input, the moments serve every inner step.
    """
    channels = images.shape[-1] // num_tasks
    patches = tf.image.extract_patches(images, [1, 3, 3, 1], strides, [1, 1, 1, 1], 'SAME')
    # depth ordered (row, column, task, channel) -> [tasks, positions, (row, column, channel)]
    patches = tf.transpose(tf.reshape(patches, [-1, 9, num_tasks, channels]), [2, 0, 1, 3])
    patches = tf.cast(tf.reshape(patches, [num_tasks, -1, 9 * channels]), tf.float64)
    count = tf.cast(tf.shape(patches)[1], tf.float64)
    mean = tf.reduce_sum(patches, 1) / count
    # E[p p'] - mean mean': in float64 its cancellation costs nothing a float32 model can see (for
    # 0/1 pixels every sum is exact), and it saves a pass over the patches.
    covariance = tf.matmul(patches, patches, transpose_a=True) / count - mean[:, :, None] * mean[:, None, :]
    return mean, covariance


def conv_batch_norm_relu_from_patches(images, kernel, bias, beta, moments_of_patches, strides,
                                      stop_gradient_in_variance=False):
    """relu(batch norm of (conv(images, kernel) + bias) + beta), every task with its own kernel
    (grouped), as conv_block computes it, from patch_moments' `moments_of_patches`.

    A channel's mean is mean_patch . w + b and its variance w' cov w, so the normalisation folds
    into the kernel and an offset: relu(conv(images, w * inv) + beta + (b - mean) * inv). No
    full-size tensor is normalised, and the derivatives of every order go through a few hundred
    numbers and a one-input-channel convolution instead of batch norm's full-size passes.
    The moments are computed in float64: w' cov w cancels (neighbouring pixels correlate, a
    kernel's weights differ in sign), and in float32 it rounds several times worse than the
    variance of the convolution's output does.
    stop_gradient_in_variance: TF 1.3's moments (see `moments`); their variance is the same
    function of the kernel plus (mean - stop_gradient(mean))^2, whose value is 0.
    """
    patch_mean, patch_covariance = moments_of_patches
    num_tasks, size = patch_mean.shape
    features = kernel.shape[-1] // num_tasks
    per_task = lambda t: tf.reshape(tf.cast(t, tf.float64), [num_tasks, features])
    w = tf.transpose(tf.reshape(tf.cast(kernel, tf.float64), [size, num_tasks, features]), [1, 0, 2])
    mean = tf.squeeze(tf.matmul(patch_mean[:, None, :], w), 1)                      # [tasks, F]
    variance = tf.reduce_sum(tf.matmul(patch_covariance, w) * w, 1)
    offset_before_norm = 0.0
    if bias is not None:
        mean += per_task(bias)
        offset_before_norm = per_task(bias)
    if stop_gradient_in_variance:
        variance += tf.square(mean - tf.stop_gradient(mean))
    inv = tf.math.rsqrt(variance + BATCH_NORM_EPSILON)
    offset = tf.reshape(tf.cast(beta, tf.float64), [-1, features]) + (offset_before_norm - mean) * inv
    scaled_kernel = tf.cast(tf.cast(kernel, tf.float64) * tf.reshape(inv, [-1]), kernel.dtype)
    return _conv_bias_relu(images, scaled_kernel, tf.cast(tf.reshape(offset, [-1]), kernel.dtype), strides)


def _conv_bias_relu(images, kernel, offset, strides):
    """relu(conv(images, kernel) + offset), differentiable twice in kernel and offset; images, the
    network's input, get no gradient.

    What autodiff would compute, with two full-size passes fewer in the second derivative: the
    offset's part of it is the convolution's bias (one fused operation, not a tile and an add),
    and the ReLU's mask, piecewise constant, adds no zeros to the output's gradient. Every tensor
    used is an argument: custom_gradient asks for the variables behind any other (the input
    pipeline's image cache is one)."""
    filter_shape = kernel.shape.as_list()

    @tf.custom_gradient
    def forward(kernel, offset, images):
        y = tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(images, kernel, strides, 'SAME'), offset))

        @tf.custom_gradient
        def backward(dy, y, images):
            g = tf.raw_ops.ReluGrad(gradients=dy, features=y)
            d_kernel = tf1.nn.conv2d_backprop_filter(images, filter_shape, g, strides, 'SAME')

            def second(h_kernel, h_offset):
                h = tf.nn.bias_add(tf.nn.conv2d(images, h_kernel, strides, 'SAME'), h_offset)
                return tf.raw_ops.ReluGrad(gradients=h, features=y), None, None
            return (d_kernel, tf.reshape(blocked_sum(g, [0, 1, 2], min_elements=0), [-1])), second
        return y, lambda dy: backward(dy, y, images) + (None,)
    return forward(kernel, offset, images)


## Losses (one value per task, or per example for classification)
def mse(pred, label):
    """Mean squared error of each task: [tasks, points, 1] -> [tasks]."""
    return tf.reduce_mean(tf.square(pred - label), axis=[1, 2])


def xent(pred, label, update_batch_size):
    """Softmax cross entropy of each example divided by K: [tasks, examples, N] -> [tasks, examples].

    Dividing by K (not by N*K) is the reference's choice: the inner step size then means the
    same thing for every N, and the loss's gradient is that of its sum.
    """
    if pred.shape.rank != 3 or not pred.shape.is_fully_defined() or pred.dtype != tf.float32:
        return tf.nn.softmax_cross_entropy_with_logits(labels=label, logits=pred) / update_batch_size
    # What tf.nn.softmax_cross_entropy_with_logits runs for float32, on the flattened shape known here:
    # the wrapper finds it at run time with a dozen shape operations, built once per loss (hundreds).
    tasks, examples, classes = pred.shape.as_list()
    loss, _ = tf.raw_ops.SoftmaxCrossEntropyWithLogits(features=tf.reshape(pred, [-1, classes]),
                                                       labels=tf.reshape(tf.cast(label, pred.dtype), [-1, classes]))
    return tf.reshape(loss, [tasks, examples]) / update_batch_size


def accuracy(pred, label):
    """Fraction of examples whose arg max matches the label's, per task: -> [tasks]."""
    correct = tf.equal(tf.argmax(pred, -1), tf.argmax(label, -1))
    return tf.reduce_mean(tf.cast(correct, tf.float32), axis=1)


## Experiment folder and checkpoints
def experiment_name(num_classes, meta_batch_size, update_batch_size, num_updates, update_lr,
                    num_filters=64, max_pool=False, stop_grad=False, baseline=None, norm='batch_norm'):
    """The reference's `exp_string`: the folder under --logdir of one experiment's files."""
    name = 'cls_{}.mbs_{}.ubs_{}.numstep{}.updatelr{}'.format(
        num_classes, meta_batch_size, update_batch_size, num_updates, update_lr)
    if num_filters != 64:
        name += 'hidden' + str(num_filters)
    if max_pool:
        name += 'maxpool'
    if stop_grad:
        name += 'stopgrad'
    if baseline:
        name += baseline
    name += {'batch_norm': 'batchnorm', 'layer_norm': 'layernorm', 'None': 'nonorm'}[norm]
    return name


_CHECKPOINT_NAME = re.compile(r'^model(\d+)$')
CHECKPOINTS_KEPT = 10
_PARTIAL_PREFIX = '.partial-'     # a save in progress: renamed to model{N} once complete


def checkpoint_iteration(path):
    """The N of a checkpoint `.../model{N}`, read from its file name only (not the whole path)."""
    match = _CHECKPOINT_NAME.match(os.path.basename(path))
    if not match:
        raise UserError('checkpoint {} is not named model<N>'.format(path))
    return int(match.group(1))


def list_checkpoints(exp_dir):
    """Every complete model{N} in exp_dir (it has an index), the newest first."""
    if not os.path.isdir(exp_dir):
        return []
    names = {f[:-len('.index')] for f in os.listdir(exp_dir) if f.endswith('.index')}
    paths = [os.path.join(exp_dir, n) for n in names if _CHECKPOINT_NAME.match(n)]
    return sorted(paths, key=checkpoint_iteration, reverse=True)


def checkpoint_problem(path):
    """None if every tensor of checkpoint `path` reads back (checksums included), else why not."""
    try:
        reader = tf1.train.load_checkpoint(path)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except Exception as error:  # noqa: BLE001  damage shows as OpError, IndexError, ValueError...
        lines = str(error).strip().splitlines()
        return '{}: {}'.format(type(error).__name__, lines[0][:160] if lines else 'unreadable')
    return None


def newest_intact_checkpoint(exp_dir):
    """(the newest checkpoint that reads back whole or None, [(newer damaged path, why)])."""
    damaged = []
    for path in list_checkpoints(exp_dir):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, damaged
        damaged.append((path, problem))
    return None, damaged


def named_checkpoint(exp_dir, iteration):
    """model{iteration} of exp_dir for --test_iter, checked whole; UserError naming the usable ones."""
    path = os.path.join(exp_dir, 'model' + str(iteration))
    problem = None if os.path.isfile(path + '.index') else 'no checkpoint'
    problem = problem or checkpoint_problem(path)
    if problem:
        intact = [checkpoint_iteration(p) for p in list_checkpoints(exp_dir) if not checkpoint_problem(p)]
        what = 'no checkpoint {}'.format(path) if problem == 'no checkpoint' else \
            'checkpoint {} is damaged ({})'.format(path, problem)
        raise UserError('--test_iter={}: {} (intact: {}); pass one of those or -1 for the newest'.format(
            iteration, what, sorted(intact) or 'none'))
    return path


def checkpoint_state_names(exp_dir):
    """The checkpoint that exp_dir's `checkpoint` file names as the newest, or None."""
    try:
        with open(os.path.join(exp_dir, 'checkpoint')) as f:
            match = re.search(r'^model_checkpoint_path: "([^"]*)"', f.read(), re.M)
    except OSError:
        return None
    return os.path.join(exp_dir, match.group(1)) if match else None


def checkpoint_files(path):
    folder, name = os.path.split(path)
    return [os.path.join(folder, f) for f in os.listdir(folder)
            if f == name + '.index' or f.startswith(name + '.data-')]


def move_checkpoint_aside(path, folder):
    """Moves the files of checkpoint `path` into `folder` (created); never deletes them."""
    os.makedirs(folder, exist_ok=True)
    for f in checkpoint_files(path):
        os.replace(f, os.path.join(folder, os.path.basename(f)))


def remove_partial_saves(exp_dir):
    """Deletes the temporaries of saves that a killed process left; returns how many files."""
    if not os.path.isdir(exp_dir):
        return 0
    partial = [f for f in os.listdir(exp_dir) if f.startswith(_PARTIAL_PREFIX)]
    for f in partial:
        os.remove(os.path.join(exp_dir, f))
    return len(partial)


def save_checkpoint(saver, sess, exp_dir, itr, keep=CHECKPOINTS_KEPT, keep_every=0):
    """Saves model{itr} so that no kill, full disk or vanished folder leaves a half-written newest one.

    The saver writes under a temporary name; the data files, then the index are renamed into place
    (a checkpoint counts only once its index exists), then the `checkpoint` file names it, then all
    but the `keep` newest are deleted, except (with keep_every > 0) those whose N is a multiple of
    keep_every. A failure removes the temporaries and raises UserError: the earlier checkpoints are
    untouched.
    """
    name = 'model' + str(itr)
    final, partial = os.path.join(exp_dir, name), os.path.join(exp_dir, _PARTIAL_PREFIX + name)
    try:
        saver.save(sess, partial, write_meta_graph=False, write_state=False)
        written = checkpoint_files(partial)
        for f in written:
            with open(f, 'rb') as handle:
                os.fsync(handle.fileno())
        if os.path.exists(final + '.index'):
            os.remove(final + '.index')
        for f in sorted(written, key=lambda f: f.endswith('.index')):     # the index last
            os.replace(f, final + f[len(partial):])
        kept = list_checkpoints(exp_dir)
        tf1.train.update_checkpoint_state(exp_dir, name, [os.path.basename(p) for p in reversed(kept[:keep])])
        for old in kept[keep:]:
            if keep_every > 0 and checkpoint_iteration(old) % keep_every == 0:
                continue
            for f in checkpoint_files(old):
                os.remove(f)
    except (tf.errors.OpError, OSError, ValueError) as error:
        try:
            for f in checkpoint_files(partial):
                os.remove(f)
        except OSError:
            pass
        reason = getattr(error, 'strerror', None) or getattr(error, 'message', None) or str(error)
        raise UserError('could not save checkpoint {} at iteration {} in {} ({}); training stopped, the '
                        'checkpoints before it are intact; free space or fix the folder, then rerun the same '
                        'command to resume'.format(name, itr, exp_dir, reason.strip().splitlines()[0][:160]))
    return final


def lock_experiment(exp_dir):
    """Takes exp_dir for this training process (until it exits); UserError if another run holds it.

    The lock is an flock on EXP/.lock, which the kernel releases when its process dies, even
    by kill -9: a stale lock never blocks the next start.
    """
    path = os.path.join(exp_dir, '.lock')
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 200).decode(errors='replace').strip() or 'a process'
        os.close(fd)
        raise UserError('another training run ({}) is writing {}; wait for it to finish or stop it '
                        '(Ctrl-C saves and stops it) before starting this one'.format(holder, exp_dir))
    os.ftruncate(fd, 0)
    os.write(fd, 'pid {} on {}'.format(os.getpid(), socket.gethostname()).encode())
    _held_locks.append(fd)
    return fd


_held_locks = []


## Progress
class Progress:
    """Iterations per second and time left, measured over the last print interval."""

    def __init__(self, first_itr, last_itr):
        self.last_itr = last_itr
        self._mark = (first_itr, time.time())

    def line(self, itr):
        start_itr, start_time = self._mark
        now = time.time()
        self._mark = (itr, now)
        rate = (itr - start_itr) / max(now - start_time, 1e-9)
        left = (self.last_itr - itr) / rate if rate > 0 else float('inf')
        return '{:.1f} it/s, {} left'.format(rate, format_seconds(left))


def format_seconds(seconds):
    if seconds == float('inf'):
        return '?'
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return '{}:{:02d}:{:02d}'.format(hours, rest // 60, rest % 60)
