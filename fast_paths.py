"""The CPU and GPU speed-ups of MAML's meta-batch: a second implementation of what maml.py defines.

maml.py's `MAML.meta_batch` is the definition: tf.map_fn over the tasks, each task's inner loop
(`fast_adapt`) by plain operations and autodiff. `FastPaths.meta_batch` computes the same numbers
for the paper's networks (four 3x3 conv blocks with batch norm, layer norm or none, ReLU, stride 2
or max pooling, and the dense head; the sinusoid's fully connected net) in less time:
- every task at once, with a leading task axis (no tf.map_fn), the tasks' kernels side by side in
  the channels of one grouped convolution (per-task convolutions where TensorFlow has no grouped
  one: a CPU without oneDNN);
- the first inner step from the shared weights: plain convolutions over all tasks' examples, each
  task's kernel gradient from a probe (`per_task_kernel_gradient_probe`);
- batch norm with the fused gradient kernel and a hand-written second derivative
  (`batch_norm_relu_per_channel`, `batch_norm_relu_per_task`), its sums in blocks (`blocked_sum`);
- the first layer's batch norm from its input's patch moments (`conv_batch_norm_relu_from_patches`);
- the inner steps nothing differentiates in one tf.while_loop; the steps nothing fetches not run;
- the conv biases before batch norm (which it cancels) left out of the inner loop.
Each function names the plain code it replaces and the test that compares the two; tests/
test_fast_paths.py holds the model equal to the plain definition in every configuration.

`choose(model)` decides per tower (the `--fast_paths` switch, ModelConfig.fast_paths): 'off' runs
the plain definition everywhere. 'auto' uses FastPaths only for the network it was written for:
where maml.py's and utils.py's network code is not the code these paths were checked against
(PLAIN_NETWORK_FINGERPRINT), it builds both on a small instance and compares their numbers, and if
they differ it runs the plain definition and prints one line saying so. Which speed-ups a device
gets is `Capabilities.of`: measured per kind of device.
"""
import hashlib
import inspect
import sys

import numpy as np
import tensorflow as tf

import utils
from utils import BATCH_NORM_EPSILON, LAYER_NORM_EPSILON

tf1 = tf.compat.v1


## Which paths run where
def _onednn_enabled():
    try:
        from tensorflow.python.util import _pywrap_util_port
        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return False


def _is_gpu(device):
    if device is None:
        return bool(tf.config.list_physical_devices('GPU'))
    return tf1.DeviceSpec.from_string(device).device_type in ('GPU', 'gpu')


class Capabilities:
    """Which speed-ups pay on a device (`of`), as measured there (bench/README.md).

    grouped_conv: the tasks' convolutions as one grouped convolution (GPUs; CPUs with oneDNN),
        else one convolution per task.
    fused_bn_grad: batch norm's gradient from the fused kernel with a hand-written second
        derivative (CPUs with oneDNN: the GPUs' kernel expects cuDNN's saved inverse variance, and
        TF's own CPU kernel rounds differently enough to move the ill-conditioned inner steps
        past num_updates out of their golden tolerances).
    blocked_sums: batch norm's sums in blocks (CPUs with oneDNN, where it was measured; without
        oneDNN the golden first-order case lands on the other side of a ReLU near-tie).
    first_layer_from_patches: the first layer's batch norm from its input's patch moments (with
        grouped convolutions and the fused gradient; batch norm without max pooling).

    Per kind of CPU: each of these, and the towers, was timed switched off in turn
    (bench/bench_forms.py) with oneDNN's AVX-512 kernels and held to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2,
    as on an AVX2-only AMD EPYC). Every one paid on both, so the choice does not depend on the
    instruction set (bench/README.md has the figures).
    """

    def __init__(self, grouped_conv, fused_bn_grad, blocked_sums, first_layer_from_patches):
        self.grouped_conv = grouped_conv
        self.fused_bn_grad = fused_bn_grad
        self.blocked_sums = blocked_sums
        self.first_layer_from_patches = first_layer_from_patches

    @classmethod
    def of(cls, device=None):
        """What pays on `device` (None: TensorFlow's default placement in this process)."""
        gpu, onednn = _is_gpu(device), _onednn_enabled()
        cpu_onednn = onednn and not gpu
        return cls(grouped_conv=gpu or onednn, fused_bn_grad=cpu_onednn, blocked_sums=cpu_onednn,
                   first_layer_from_patches=cpu_onednn)

    def __repr__(self):
        return 'Capabilities({})'.format(', '.join('{}={}'.format(k, v) for k, v in vars(self).items()))


def choose(model):
    """The fast paths of each of model's towers, or None where the plain definition runs."""
    if model.config.fast_paths == 'off':
        return [None] * len(model.towers)
    problem = network_problem(model)
    if problem:
        print('fast paths: {}; running the plain definition (maml.py) instead, as with --fast_paths=off'.format(
            problem), flush=True)
        return [None] * len(model.towers)
    return [FastPaths(model, Capabilities.of(device)) for device in model.towers]


# The functions whose arithmetic FastPaths computes again: MAML's methods (of the model's class, so a
# subclass's overrides count) and the helpers they call, as maml.py sees them.
MODEL_METHODS = ('construct_weights', 'construct_conv_weights', 'construct_fc_weights', 'forward', 'forward_fc',
                 'forward_conv', 'loss_func', 'fast_adapt', 'gradient_step', 'meta_batch')
HELPERS = ('normalize', 'conv_block', 'make_norm_params', 'mse', 'xent')
UTILS_HELPERS = ('moments', 'mean_over')
# plain_network_fingerprint() of the code tests/test_fast_paths.py holds equal to FastPaths. After a
# change to it: run those tests, and set this to the new fingerprint if they pass.
PLAIN_NETWORK_FINGERPRINT = '0bd990406cf3b3f6'


def plain_network_fingerprint(model_class):
    """A digest of the source of the plain network and inner loop, as model_class runs them."""
    module = sys.modules[model_class.__module__]
    functions = [getattr(model_class, name) for name in MODEL_METHODS]
    functions += [getattr(module, name, None) for name in HELPERS]
    functions += [getattr(utils, name) for name in UTILS_HELPERS]
    digest = hashlib.sha256()
    for function in functions:
        try:
            digest.update(inspect.getsource(function).encode())
        except (TypeError, OSError):   # not a function written in Python source: unknown
            digest.update(repr(function).encode())
    return digest.hexdigest()[:16]


def network_problem(model):
    """None if FastPaths computes model's network (or where it cannot tell, the small instance it
    builds of both gives the same numbers); else what differs, in a few words."""
    if plain_network_fingerprint(type(model)) == PLAIN_NETWORK_FINGERPRINT:
        return None
    difference = compare_on_a_small_instance(model)
    if difference:
        return 'the network or inner loop is not the one they were written for ({})'.format(difference)
    print('fast paths: the network code is not the code they were checked against, but a small instance of it '
          'computes the same numbers both ways: they run', flush=True)
    return None


SELF_CHECK_TOLERANCE = 1e-3   # of each quantity's largest magnitude


def compare_on_a_small_instance(model):
    """Builds a small instance of model's network (2 tasks, 4 filters, 2 inner steps, step size 0.01)
    with the plain definition and with FastPaths on shared weights and random inputs; None if their
    query outputs and meta-gradients agree, else which differs (or what failed building them)."""
    import dataclasses
    cfg = model.config
    small = dataclasses.replace(cfg, meta_batch_size=2, num_filters=min(cfg.num_filters, 4), update_lr=0.01,
                                num_updates=2, pretraining=False)
    rng = np.random.RandomState(0)
    try:
        with tf.Graph().as_default():
            tf1.set_random_seed(0)
            values = {}
            for name, path in (('plain', 'off'), ('fast', 'auto')):
                twin = type(model)(dataclasses.replace(small, fast_paths=path), model.dim_input, model.dim_output,
                                   test_num_updates=3)
                with tf1.variable_scope('model', reuse=tf1.AUTO_REUSE):
                    twin.weights, twin.norm_params = twin.construct_weights()
                twin.fast_paths = [None] if path == 'off' else [FastPaths(twin, Capabilities.of())]
                inputs = {k: tf1.placeholder(tf.float32, [2, None, model.dim_input if k.startswith('input')
                                                          else model.dim_output]) for k in
                          ('inputa', 'inputb', 'labela', 'labelb')}
                with tf1.variable_scope('model', reuse=tf1.AUTO_REUSE):
                    outputs = twin.meta_batch_on_towers(inputs['inputa'], inputs['labela'], inputs['inputb'],
                                                        inputs['labelb'], 3, 2)
                loss = tf.reduce_sum(outputs[3][1])
                variables = tf1.trainable_variables()
                gradients = [tf.zeros_like(v) if g is None else g for g, v in zip(tf.gradients(loss, variables),
                                                                                   variables)]
                values[name] = (inputs, outputs[2] + [loss], gradients)
            examples = small.num_classes * small.update_batch_size if cfg.classification else 5
            feed = {}
            for name in values:
                for key, placeholder in values[name][0].items():
                    size = model.dim_input if key.startswith('input') else model.dim_output
                    if key not in feed:
                        feed[key] = (np.tile(np.eye(size, dtype=np.float32), (2, examples // size, 1))
                                     if key.startswith('label') and cfg.classification
                                     else rng.uniform(0, 1, [2, examples, size]).astype(np.float32))
            with tf1.Session() as sess:
                sess.run(tf1.global_variables_initializer())
                computed = {name: sess.run([outs, grads], {values[name][0][k]: v for k, v in feed.items()})
                            for name, (_, outs, grads) in values.items()}
    except Exception as error:  # noqa: BLE001  a network the fast paths cannot even build
        return 'building it failed: {}'.format(str(error).strip().splitlines()[0][:120] if str(error) else
                                               type(error).__name__)
    for what, plain, fast in (('outputs', computed['plain'][0], computed['fast'][0]),
                              ('meta-gradients', computed['plain'][1], computed['fast'][1])):
        # A quantity's scale is its own largest magnitude, or a hundredth of the largest of its kind
        # where it is smaller (a gradient that is zero but for rounding: a conv bias before batch norm).
        largest = max(np.max(np.abs(want)) for want in plain)
        for want, got in zip(plain, fast):
            scale = max(np.max(np.abs(want)), 1e-2 * largest, 1e-6)
            if np.shape(want) != np.shape(got) or np.max(np.abs(got - want)) > SELF_CHECK_TOLERANCE * scale:
                return 'its {} differ on a small instance'.format(what)
    return None


## The meta-batch, every task at once
CONV_BIASES = ('b1', 'b2', 'b3', 'b4')


class FastPaths:
    """MAML.meta_batch (maml.py) for the paper's networks, faster: the tasks side by side instead of
    tf.map_fn, with the speed-ups `capabilities` (Capabilities) allows on this tower's device.

    Replaces: MAML.meta_batch, fast_adapt, gradient_step, forward_conv, forward_fc and loss_func.
    Tested equal: tests/test_fast_paths.py (every configuration, one device and towers) and the
    golden cases (tests/test_golden.py, both paths)."""

    def __init__(self, model, capabilities):
        self.model = model
        self.config = model.config
        self.capabilities = capabilities
        # Batch norm subtracts each channel's mean, so the conv biases before it change nothing: in
        # the exact math (not TF 1.3's moments) their gradients are 0 and the inner loop leaves them out.
        self.conv_biases_cancel = (model.use_conv and self.config.norm == 'batch_norm'
                                   and not self.config.moments_stop_gradient)
        self._patch_moments = {}   # input tensor -> (its images, tasks in the channels; their patch_moments)

    # ---------------------------------------------------------------- the inner loop
    def meta_batch(self, inputa, labela, inputb, labelb, num_steps, unrolled_steps=None):
        """Algorithm 1's inner loop for every task of the batch at once ([tasks, examples, dim]).

        Each task gets its own copy of the weights; `num_steps` gradient steps on the support set
        (a) turn them into fast weights, and after each step the query set (b) is evaluated.
        Returns (outputa, lossa, [outputb after step j], [lossb after step j]), as MAML.meta_batch.

        The first step starts from the shared weights, so its support pass runs as plain
        convolutions over all tasks' examples (`_support_pass_from_shared_weights`); later steps
        convolve each task with its own kernels (grouped). The first `unrolled_steps` (default: all;
        for conv nets at least the first) are built one after another: the meta-gradient goes
        through them. The rest, which only summaries and evaluation read, run in one tf.while_loop,
        so their operations are built once instead of once per step: the graph of Omniglot's ten
        reported steps builds in a fraction of the time, and computes the same numbers.
        """
        model = self.model
        num_tasks = inputa.shape[0]
        unrolled_steps = num_steps if unrolled_steps is None else min(unrolled_steps, num_steps)
        if model.use_conv:   # the first step runs from the shared weights (plain convolutions) in every graph
            unrolled_steps = max(unrolled_steps, min(1, num_steps))
        # The pre-update quantities need no per-task copies: one batch through the shared weights.
        outputa = self.forward(inputa, model.weights)
        lossa = self.loss(outputa, labela)
        fast_weights = self.weights_per_task(num_tasks)
        self._remember_patch_moments([inputa, inputb])
        outputbs, lossesb = [], []
        for step in range(unrolled_steps):
            fast_weights, outputb, lossb = self._inner_step(inputa, labela, inputb, labelb, fast_weights,
                                                            from_shared_weights=step == 0 and model.use_conv)
            outputbs.append(outputb)
            lossesb.append(lossb)
        if num_steps > unrolled_steps:
            more_outputbs, more_lossesb = self._inner_steps_in_loop(inputa, labela, inputb, labelb, fast_weights,
                                                                    num_steps - unrolled_steps)
            outputbs += more_outputbs
            lossesb += more_lossesb
        return outputa, lossa, outputbs, lossesb

    def _inner_step(self, inputa, labela, inputb, labelb, fast_weights, from_shared_weights=False):
        """One gradient step on the support set; (new fast weights, query output, query loss).
        from_shared_weights: the fast weights are still the shared weights' copies (the first step)."""
        if from_shared_weights:
            output, probes = self._support_pass_from_shared_weights(inputa, fast_weights)
            fast_weights = self._gradient_step(self.loss(output, labela), fast_weights, probes)
        else:
            support_loss = self.loss(self.forward(inputa, fast_weights, per_task=True), labela)
            fast_weights = self._gradient_step(support_loss, fast_weights)
        outputb = self.forward(inputb, fast_weights, per_task=True)
        return fast_weights, outputb, self.loss(outputb, labelb)

    def _inner_steps_in_loop(self, inputa, labela, inputb, labelb, fast_weights, count):
        """`count` more inner steps as a tf.while_loop; ([outputb after each], [lossb after each])."""
        names = list(fast_weights)

        def body(step, weights, outputbs, lossesb):
            weights, outputb, lossb = self._inner_step(inputa, labela, inputb, labelb, dict(zip(names, weights)))
            return step + 1, [weights[n] for n in names], outputbs.write(step, outputb), lossesb.write(step, lossb)

        arrays = [tf.TensorArray(tf.float32, size=count) for _ in range(2)]
        _, _, outputbs, lossesb = tf.while_loop(
            lambda step, *_: step < count, body, [tf.constant(0), [fast_weights[n] for n in names], *arrays])
        return tf.unstack(outputbs.stack(), count), tf.unstack(lossesb.stack(), count)

    def weights_per_task(self, num_tasks):
        """One copy of every weight per task.

        Dense weights get a leading task axis. Convolution kernels [3, 3, C, F] and their biases
        become [3, 3, C, tasks*F] and [tasks*F]: the tasks side by side in the channels, the
        layout grouped convolution takes, so no step of the inner loop transposes them.
        """
        model = self.model
        copies = {}
        for name, weight in model.weights.items():
            if self.conv_biases_cancel and name in CONV_BIASES:
                continue
            if model.use_conv and name not in ('w5', 'b5'):     # conv1..conv4, b1..b4
                copies[name] = tf.tile(weight, [1] * (weight.shape.rank - 1) + [num_tasks])
            else:
                copies[name] = tf.tile(weight[None], [num_tasks] + [1] * weight.shape.rank)
        return copies

    def _gradient_step(self, loss, weights, stand_ins=None):
        """weights - update_lr * their gradient of loss (MAML.gradient_step, for every task at once);
        `stand_ins`: tensors whose gradient is that of the weight of the same name (the first
        step's kernel probes)."""
        # Tasks are independent, so the gradient of the summed loss with respect to task t's copy
        # of the weights is the gradient of task t's own loss.
        stand_ins = stand_ins or {}
        grads = tf.gradients(tf.reduce_sum(loss), [stand_ins.get(k, w) for k, w in weights.items()])
        if self.config.stop_grad:
            grads = [tf.stop_gradient(g) for g in grads]   # first-order MAML
        return {k: w - self.model.update_lr * g for (k, w), g in zip(weights.items(), grads)}

    def loss(self, pred, label):
        """MAML.loss_func for every task: [tasks] (MSE) or [tasks, examples] (cross entropy / K)."""
        if self.model.classification:
            return xent_per_task(pred, label, self.config.update_batch_size)
        return tf.reduce_mean(tf.square(pred - label), axis=[1, 2])

    # ---------------------------------------------------------------- the networks
    def forward(self, inp, weights, per_task=False):
        """MAML.forward for a batch of tasks, inp [tasks, examples, dim]. `weights` are the shared
        weights, or with `per_task` one copy per task (see `weights_per_task`). Normalisation
        statistics are always those of one task."""
        if self.model.use_conv:
            return self.forward_conv(inp, weights, per_task)
        return self.forward_fc(inp, weights)

    def forward_fc(self, inp, weights):
        """MAML.forward_fc for every task: batched products with shared or per-task weights."""
        model, hidden = self.model, inp
        for i in range(len(model.dim_hidden)):
            hidden = _dense(hidden, weights['w%d' % (i + 1)], weights['b%d' % (i + 1)])
            hidden = normalize_per_task(hidden, self.config.norm, model.norm_params[i], batch_axes=[1],
                                        feature_axes=[2], stop_gradient_in_variance=self.config.moments_stop_gradient)
        last = len(model.dim_hidden) + 1
        return _dense(hidden, weights['w%d' % last], weights['b%d' % last])

    def forward_conv(self, inp, weights, per_task):
        """MAML.forward_conv for every task: one batch through the shared kernels, or each task's own."""
        model = self.model
        num_tasks = inp.shape[0]
        images = tf.reshape(inp, [num_tasks, -1, model.img_size, model.img_size, model.channels])
        if per_task:
            features = self._conv_layers_per_task(images, weights, *self._patch_moments.get(inp.ref(), (None, None)))
        else:
            features = self._conv_layers_shared(images, weights)
        return self._conv_head(features, weights)

    def _conv_head(self, features, weights):
        """features [tasks, examples, H, W, F] -> logits [tasks, examples, N]."""
        num_tasks = features.shape[0]
        if self.config.datasource == 'miniimagenet':
            _, _, height, width, filters = features.shape
            features = tf.reshape(features, [num_tasks, -1, height * width * filters])
        else:
            features = tf.reduce_mean(features, [2, 3])
        return _dense(features, weights['w5'], weights['b5'])

    def _conv_layers_shared(self, images, weights):
        """All tasks' examples as one batch through the shared kernels (normalised per task)."""
        model, cfg = self.model, self.config
        num_tasks = images.shape[0]
        x = tf.reshape(images, [-1] + images.shape[2:].as_list())
        strides = self._strides()
        for i in range(4):
            x = tf.nn.conv2d(x, weights['conv%d' % (i + 1)], strides, 'SAME') + weights['b%d' % (i + 1)]
            per_task = tf.reshape(x, [num_tasks, -1] + x.shape[1:].as_list())
            per_task = normalize_per_task(per_task, cfg.norm, model.norm_params[i], batch_axes=[1, 2, 3],
                                          feature_axes=[2, 3, 4], stop_gradient_in_variance=cfg.moments_stop_gradient,
                                          blocked_sums=self.capabilities.blocked_sums)
            x = tf.reshape(per_task, [-1] + x.shape[1:].as_list())
            if cfg.max_pool:
                x = tf.nn.max_pool2d(x, [1, 2, 2, 1], [1, 2, 2, 1], 'VALID')
        return tf.reshape(x, [num_tasks, -1] + x.shape[1:].as_list())

    def _conv_layers_per_task(self, images, weights, task_channel_images=None, moments_of_patches=None):
        """Each task through its own kernels, its channels side by side (grouped convolution).
        task_channel_images, moments_of_patches: what _remember_patch_moments made of these images; the
        first layer's batch norm is then computed from the moments (conv_batch_norm_relu_from_patches)."""
        model, cfg, can = self.model, self.config, self.capabilities
        num_tasks = images.shape[0]
        x = to_task_channels(images) if task_channel_images is None else task_channel_images
        for i in range(4):
            if i == 0 and moments_of_patches is not None:
                x = conv_batch_norm_relu_from_patches(x, weights['conv1'], weights.get('b1'),
                                                      model.norm_params[0]['beta'], moments_of_patches,
                                                      self._strides(), cfg.moments_stop_gradient)
                continue
            x = conv_block_per_task(x, weights['conv%d' % (i + 1)], weights.get('b%d' % (i + 1)), num_tasks, cfg.norm,
                                    model.norm_params[i], cfg.max_pool, can.grouped_conv, can.fused_bn_grad,
                                    cfg.moments_stop_gradient, can.blocked_sums)
        _, height, width, _ = x.shape
        x = tf.reshape(x, [-1, height, width, num_tasks, cfg.num_filters])
        return tf.transpose(x, [3, 0, 1, 2, 4])

    def _strides(self):
        return [1, 1, 1, 1] if self.config.max_pool else [1, 2, 2, 1]

    def _first_layer_from_patches(self):
        """Whether the per-task passes compute the first layer's batch norm from patch_moments: for
        batch norm without max pooling, where the device's capabilities allow it."""
        return (self.model.use_conv and self.config.norm == 'batch_norm' and not self.config.max_pool
                and self.capabilities.grouped_conv and self.capabilities.fused_bn_grad
                and self.capabilities.first_layer_from_patches)

    def _remember_patch_moments(self, inputs):
        """patch_moments of each input, for every per-task pass over it (each inner step's)."""
        self._patch_moments = {}
        if not self._first_layer_from_patches():
            return
        model = self.model
        for inp in inputs:
            images = to_task_channels(tf.reshape(inp, [inp.shape[0], -1, model.img_size, model.img_size,
                                                       model.channels]))
            self._patch_moments[inp.ref()] = images, patch_moments(images, inp.shape[0], self._strides())

    def _support_pass_from_shared_weights(self, inp, weights):
        """The first inner step's support pass, where every task still has the shared kernels:
        each layer one plain convolution over all tasks' examples (normalised per task), the head
        with the per-task `weights`. Returns (output, {kernel name: probe}): the gradient with
        respect to a probe is each task's own gradient of that kernel (per_task_kernel_gradient_probe).
        Replaces the first step's MAML.forward_conv; tested equal in tests/test_first_step.py."""
        model, cfg, can = self.model, self.config, self.capabilities
        num_tasks = inp.shape[0]
        x = tf.reshape(inp, [-1, model.img_size, model.img_size, model.channels])   # tasks in the batch
        strides = self._strides()
        probes = {}
        task_channel_images, moments_of_patches = self._patch_moments.get(inp.ref(), (None, None))
        for i in range(4):
            name, bias = 'conv%d' % (i + 1), weights.get('b%d' % (i + 1))
            if i == 0 and moments_of_patches is not None:
                # Each task's own kernel (its per-task copy), the tasks in the channels; then back
                # to the tasks in the batch for the next layer's plain convolution.
                y = conv_batch_norm_relu_from_patches(task_channel_images, weights[name], bias,
                                                      model.norm_params[0]['beta'], moments_of_patches, strides,
                                                      cfg.moments_stop_gradient)
                x = from_task_channels(y, num_tasks)
                continue
            z = tf.nn.conv2d(x, model.weights[name], strides, 'SAME')
            z, probes[name] = per_task_kernel_gradient_probe(z, x, num_tasks, strides, can.grouped_conv)
            per_task = tf.reshape(z, [num_tasks, -1] + z.shape[1:].as_list())
            if bias is not None:
                per_task = per_task + tf.reshape(bias, [num_tasks, 1, 1, 1, -1])
            if cfg.norm == 'batch_norm':
                per_task = batch_norm_relu_per_task(per_task, model.norm_params[i]['beta'],
                                                    cfg.moments_stop_gradient, can.blocked_sums)
            else:
                per_task = normalize_per_task(per_task, cfg.norm, model.norm_params[i], batch_axes=[1, 2, 3],
                                              feature_axes=[2, 3, 4], stop_gradient_in_variance=cfg.moments_stop_gradient)
            x = tf.reshape(per_task, [-1] + z.shape[1:].as_list())
            if cfg.max_pool:
                x = tf.nn.max_pool2d(x, [1, 2, 2, 1], [1, 2, 2, 1], 'VALID')
        features = tf.reshape(x, [num_tasks, -1] + x.shape[1:].as_list())
        return self._conv_head(features, weights), probes


def _dense(x, weight, bias):
    """x [tasks, examples, d] times a shared [d, h] or per-task [tasks, d, h] weight, plus bias."""
    if weight.shape.rank == 2:
        return tf.tensordot(x, weight, [[2], [0]]) + bias
    return tf.matmul(x, weight) + bias[:, None, :]


def xent_per_task(pred, label, update_batch_size):
    """utils.xent for [tasks, examples, N] -> [tasks, examples]: the kernel of
    tf.nn.softmax_cross_entropy_with_logits for float32 on the flattened shape known here (the
    wrapper finds it at run time with a dozen shape operations, built once per loss: hundreds).
    Tested equal: tests/test_graph_cost.py."""
    if pred.shape.rank != 3 or not pred.shape.is_fully_defined() or pred.dtype != tf.float32:
        return utils.xent(pred, label, update_batch_size)
    tasks, examples, classes = pred.shape.as_list()
    loss, _ = tf.raw_ops.SoftmaxCrossEntropyWithLogits(features=tf.reshape(pred, [-1, classes]),
                                                       labels=tf.reshape(tf.cast(label, pred.dtype), [-1, classes]))
    return tf.reshape(loss, [tasks, examples]) / update_batch_size


def normalize_per_task(x, norm, params, batch_axes, feature_axes, stop_gradient_in_variance=False,
                       blocked_sums=False):
    """utils.normalize (then ReLU) for tensors holding several tasks: batch norm's statistics over
    `batch_axes` (one task's examples and positions), layer norm's over `feature_axes`; with
    `blocked_sums`, batch norm's sums in blocks (channel_affine). Tested equal: tests/test_batch_norm.py."""
    if norm == 'batch_norm':
        mean, variance = utils.moments(x, batch_axes, stop_gradient_in_variance, mean=_mean_function(blocked_sums))
        if blocked_sums:   # tf.nn.batch_normalization's arithmetic, its gradient's sums blocked
            inv = tf.math.rsqrt(variance + BATCH_NORM_EPSILON)
            x = channel_affine(x, inv, params['beta'] - mean * inv, batch_axes)
        else:
            x = tf.nn.batch_normalization(x, mean, variance, params['beta'], None, BATCH_NORM_EPSILON)
    elif norm == 'layer_norm':
        mean, variance = utils.moments(x, feature_axes, stop_gradient_in_variance)
        x = tf.nn.batch_normalization(x, mean, variance, params['beta'], params['gamma'], LAYER_NORM_EPSILON)
    return tf.nn.relu(x)


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
    Replaces tf.reduce_sum in batch norm's sums; tested equal: tests/test_batch_norm.py
    (test_blocked_sum_is_reduce_sum, test_blocked_sum_at_least_as_accurate_as_reduce_sum).
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


def blocked_mean(x, axes):
    return blocked_sum(x, axes) / _count(x, axes)


def _mean_function(blocked_sums):
    """The means utils.moments takes: blocked_mean, or tf.reduce_mean's (utils.mean_over)."""
    return blocked_mean if blocked_sums else utils.mean_over


def channel_affine(x, scale, offset, axes):
    """x * scale + offset (offset None: none), scale and offset shaped as x but 1 along `axes`, with
    derivatives of every order whose sums over `axes` are blocked_sum's, where autodiff's would be
    tf.reduce_sum's.
    Replaces the multiply-add of tf.nn.batch_normalization; tested equal:
    tests/test_batch_norm.py (test_blocked_sums_change_only_rounding).
    """
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



def batch_norm_relu_per_channel(x, beta, stop_gradient_in_variance=False, blocked_sums=False):
    """relu(batch norm of x [N, H, W, C] over N, H, W, + beta): the per-task layers' norm. beta: [C],
    or [F] shared by the tasks when C = tasks * F (tasks side by side in the channels).

    The values are those of `normalize` (tf.nn.moments, tf.nn.batch_normalization, relu). The
    fused forward kernel (FusedBatchNormV3) also passes the golden cases on the real 0/1 Omniglot
    pixels, but measured no faster per meta-update with oneDNN on, so it is not used. The
    gradient uses the fused gradient kernel, and its own gradient (the inner loop is
    differentiated) is written out by hand; both equal TF's autodiff of `normalize`,
    which builds several times as many full-size elementwise passes (Capabilities.fused_bn_grad
    says where it is used).
    Replaces utils.normalize's batch norm and ReLU; tested equal: tests/test_batch_norm.py.
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
        mean, variance = utils.moments(x, axes, stop_gradient_in_variance=True, mean=_mean_function(blocked_sums))
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


def conv_per_task(x, kernel, num_tasks, strides, grouped):
    """Convolves each task's channels of x [examples, H, W, tasks*C] with that task's kernel.

    `kernel` [3, 3, C, tasks*F] holds the tasks' kernels side by side, the layout of a grouped
    convolution (input channels = tasks * kernel input channels), which does all tasks at once.
    Without grouped convolution (CPU without oneDNN) each task gets its own convolution.
    Replaces utils.conv_block's tf.nn.conv2d, one task at a time; tested equal through the model:
    tests/test_fast_paths.py.
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
    Replaces the first inner step's per-task convolutions (utils.conv_block with each task's
    copy of the kernel); tested equal: tests/test_first_step.py.
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


def conv_block_per_task(x, kernel, bias, num_tasks, norm, norm_params, max_pool, grouped=True, fused_bn_grad=False,
                        stop_gradient_in_variance=False, blocked_sums=False):
    """utils.conv_block for every task at once, each with its own kernel: conv (+bias) ->
    normalisation -> ReLU (-> 2x2 max pool).

    x: [examples, H, W, tasks*C]; kernel: [3, 3, C, tasks*F]; bias: [tasks*F], or None (no bias).
    stop_gradient_in_variance: see utils.moments; blocked_sums: sums in blocks (blocked_sum).
    Tested equal: tests/test_fast_paths.py, through the model.
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
        per_task = normalize_per_task(per_task, norm, norm_params, batch_axes=[0, 1, 2], feature_axes=[1, 2, 4],
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
    Replaces the first layer's batch norm statistics (utils.moments of utils.conv_block's
    convolution); tested equal: tests/test_first_layer.py.
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
    Replaces utils.conv_block for the first layer (batch norm, no max pooling); tested equal:
    tests/test_first_layer.py.
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

