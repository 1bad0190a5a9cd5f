"""Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, ICML 2017) as a TF1-style graph.

`MAML` builds the networks of the paper, the inner loop (`fast_adapt`: a few gradient steps on
each task's support set) and the outer loop (Adam on the query loss after those steps, through
them). It takes plain values (`ModelConfig`), never command-line flags.
"""
import contextlib
import dataclasses

import numpy as np
import tensorflow as tf

import special_grads  # noqa: F401  (second derivative of max pooling where TF lacks one)
from utils import (accuracy, batch_norm_relu_per_task, blocked_sums_supported, conv_batch_norm_relu_from_patches,
                   conv_block, from_task_channels, fused_bn_grad_supported, grouped_conv_supported, make_norm_params,
                   mse, normalize, patch_moments, per_task_kernel_gradient_probe, to_task_channels, xent)

tf1 = tf.compat.v1

FC_HIDDEN_SINUSOID = [40, 40]
FC_HIDDEN_IMAGES = [256, 128, 64, 64]
MINIIMAGENET_GRAD_CLIP = 10.0
CONV_BIASES = ('b1', 'b2', 'b3', 'b4')


@dataclasses.dataclass
class ModelConfig:
    """What the graph depends on; the defaults are the reference's flag defaults."""
    datasource: str = 'sinusoid'
    num_classes: int = 5
    meta_batch_size: int = 25
    meta_lr: float = 0.001
    update_batch_size: int = 5
    update_lr: float = 1e-3
    num_updates: int = 1
    norm: str = 'batch_norm'
    num_filters: int = 64
    conv: bool = True
    max_pool: bool = False
    stop_grad: bool = False
    moments_stop_gradient: bool = False   # batch/layer norm's moments as TF >= 1.3 (utils.moments)
    pretraining: bool = True   # build the pre-training op (--pretrain_iterations > 0); see _build_train_ops

    @property
    def classification(self):
        return self.datasource in ('omniglot', 'miniimagenet')


class MAML:
    """`towers`: devices that each take an equal part of every meta-batch (its inner loops and their
    share of the meta-gradient); None: TensorFlow's default placement. `param_device` holds the
    weights, the optimizer and everything computed over the whole meta-batch."""

    def __init__(self, config, dim_input=1, dim_output=1, test_num_updates=5, towers=None, param_device=None):
        if config.datasource not in ('sinusoid', 'omniglot', 'miniimagenet'):
            raise ValueError('Unrecognized data source: {}'.format(config.datasource))
        self.config = config
        self.dim_input = dim_input
        self.dim_output = dim_output
        self.test_num_updates = test_num_updates
        self.update_lr = config.update_lr
        self.meta_lr = tf1.placeholder_with_default(np.float32(config.meta_lr), (), name='meta_lr')
        self.classification = config.classification
        self.use_conv = self.classification and config.conv
        if self.use_conv:
            self.channels = 3 if config.datasource == 'miniimagenet' else 1
            self.img_size = int(np.sqrt(dim_input / self.channels))
        else:
            self.dim_hidden = FC_HIDDEN_SINUSOID if config.datasource == 'sinusoid' else FC_HIDDEN_IMAGES
        self.weights = None
        self.norm_params = None
        self.towers = list(towers) if towers else [None]
        self.param_device = param_device
        # Batch norm subtracts each channel's mean, so the conv biases before it change nothing: in
        # the exact math (not TF 1.3's moments) their gradients are 0 and the inner loop leaves them out.
        self.conv_biases_cancel = (self.use_conv and config.norm == 'batch_norm'
                                   and not config.moments_stop_gradient)
        self.grouped_conv = grouped_conv_supported(self.towers[0])
        self.fused_bn_grad = fused_bn_grad_supported(self.towers[0])
        self.blocked_sums = blocked_sums_supported(self.towers[0])
        self._patch_moments = {}   # input tensor -> (its images, tasks in the channels; their patch_moments)
        self.allow_first_layer_from_patches = True   # off: the first layer as conv_block (to compare)

    # ---------------------------------------------------------------- weights
    def construct_weights(self):
        """Creates the variables with the reference's names, so its checkpoints restore."""
        if self.use_conv:
            return self._construct_conv_weights()
        return self._construct_fc_weights()

    def _construct_fc_weights(self):
        sizes = [self.dim_input] + self.dim_hidden + [self.dim_output]
        weights, norm_params = {}, {}
        for i in range(len(sizes) - 1):
            # The reference made these with unnamed tf.Variable: Variable, Variable_1, ...
            weights['w%d' % (i + 1)] = tf1.get_variable(
                _unnamed(2 * i), [sizes[i], sizes[i + 1]],
                initializer=tf1.truncated_normal_initializer(stddev=0.01))
            weights['b%d' % (i + 1)] = tf1.get_variable(
                _unnamed(2 * i + 1), [sizes[i + 1]], initializer=tf1.zeros_initializer())
        for i, width in enumerate(self.dim_hidden):
            norm_params[i] = make_norm_params(self.config.norm, _fc_norm_scope(i), width)
        return weights, norm_params

    def _construct_conv_weights(self):
        filters, k = self.config.num_filters, 3
        conv_init = tf1.glorot_uniform_initializer()
        weights, norm_params = {}, {}
        in_channels = self.channels
        for i in range(4):
            weights['conv%d' % (i + 1)] = tf1.get_variable(
                'conv%d' % (i + 1), [k, k, in_channels, filters], initializer=conv_init)
            weights['b%d' % (i + 1)] = tf1.get_variable(
                _unnamed(i), [filters], initializer=tf1.zeros_initializer())
            in_channels = filters
        if self.config.datasource == 'miniimagenet':
            # Four 2x2 max pools take 84x84 to 5x5; the head sees the flattened map.
            weights['w5'] = tf1.get_variable('w5', [filters * 5 * 5, self.dim_output],
                                             initializer=tf1.glorot_uniform_initializer())
        else:
            # Omniglot's head is drawn from a *standard* normal, as in the reference.
            weights['w5'] = tf1.get_variable('w5', [filters, self.dim_output],
                                             initializer=tf1.random_normal_initializer(stddev=1.0))
        weights['b5'] = tf1.get_variable('b5', [self.dim_output], initializer=tf1.zeros_initializer())
        for i in range(4):
            norm_params[i] = make_norm_params(self.config.norm, str(i), filters)
        return weights, norm_params

    # ---------------------------------------------------------------- networks
    def forward(self, inp, weights, per_task=False):
        """The network on a batch of tasks, inp [tasks, examples, dim].

        `weights` are the shared weights, or with `per_task` one copy per task (see
        `weights_per_task`). Normalisation statistics are always those of one task.
        """
        if self.use_conv:
            return self.forward_conv(inp, weights, per_task)
        return self.forward_fc(inp, weights)

    def forward_fc(self, inp, weights):
        hidden = inp
        for i in range(len(self.dim_hidden)):
            hidden = _dense(hidden, weights['w%d' % (i + 1)], weights['b%d' % (i + 1)])
            hidden = normalize(hidden, self.config.norm, self.norm_params[i], batch_axes=[1],
                               feature_axes=[2], stop_gradient_in_variance=self.config.moments_stop_gradient)
        last = len(self.dim_hidden) + 1
        return _dense(hidden, weights['w%d' % last], weights['b%d' % last])

    def forward_conv(self, inp, weights, per_task):
        num_tasks = inp.shape[0]
        images = tf.reshape(inp, [num_tasks, -1, self.img_size, self.img_size, self.channels])
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
        num_tasks = images.shape[0]
        x = tf.reshape(images, [-1] + images.shape[2:].as_list())
        strides = self._strides()
        for i in range(4):
            x = tf.nn.conv2d(x, weights['conv%d' % (i + 1)], strides, 'SAME') + weights['b%d' % (i + 1)]
            per_task = tf.reshape(x, [num_tasks, -1] + x.shape[1:].as_list())
            per_task = normalize(per_task, self.config.norm, self.norm_params[i], batch_axes=[1, 2, 3],
                                 feature_axes=[2, 3, 4], stop_gradient_in_variance=self.config.moments_stop_gradient,
                                 blocked_sums=self.blocked_sums)
            x = tf.reshape(per_task, [-1] + x.shape[1:].as_list())
            if self.config.max_pool:
                x = tf.nn.max_pool2d(x, [1, 2, 2, 1], [1, 2, 2, 1], 'VALID')
        return tf.reshape(x, [num_tasks, -1] + x.shape[1:].as_list())

    def _conv_layers_per_task(self, images, weights, task_channel_images=None, moments_of_patches=None):
        """Each task through its own kernels, its channels side by side (grouped convolution).
        task_channel_images, moments_of_patches: what _remember_patch_moments made of these images; the
        first layer's batch norm is then computed from the moments (conv_batch_norm_relu_from_patches)."""
        num_tasks = images.shape[0]
        x = to_task_channels(images) if task_channel_images is None else task_channel_images
        for i in range(4):
            if i == 0 and moments_of_patches is not None:
                x = conv_batch_norm_relu_from_patches(x, weights['conv1'], weights.get('b1'),
                                                      self.norm_params[0]['beta'], moments_of_patches,
                                                      self._strides(), self.config.moments_stop_gradient)
                continue
            x = conv_block(x, weights['conv%d' % (i + 1)], weights.get('b%d' % (i + 1)), num_tasks,
                           self.config.norm, self.norm_params[i], self.config.max_pool, self.grouped_conv,
                           self.fused_bn_grad, self.config.moments_stop_gradient, self.blocked_sums)
        _, height, width, _ = x.shape
        x = tf.reshape(x, [-1, height, width, num_tasks, self.config.num_filters])
        return tf.transpose(x, [3, 0, 1, 2, 4])

    def _strides(self):
        return [1, 1, 1, 1] if self.config.max_pool else [1, 2, 2, 1]

    def _first_layer_from_patches(self):
        """Whether the per-task passes compute the first layer's batch norm from patch_moments: for
        batch norm without max pooling on CPUs with oneDNN, where it was measured."""
        return (self.use_conv and self.config.norm == 'batch_norm' and not self.config.max_pool
                and self.grouped_conv and self.fused_bn_grad and self.allow_first_layer_from_patches)

    def _remember_patch_moments(self, inputs):
        """patch_moments of each input, for every per-task pass over it (each inner step's)."""
        self._patch_moments = {}
        if not self._first_layer_from_patches():
            return
        for inp in inputs:
            images = to_task_channels(tf.reshape(inp, [inp.shape[0], -1, self.img_size, self.img_size, self.channels]))
            self._patch_moments[inp.ref()] = images, patch_moments(images, inp.shape[0], self._strides())

    def _support_pass_from_shared_weights(self, inp, weights):
        """The first inner step's support pass, where every task still has the shared kernels:
        each layer one plain convolution over all tasks' examples (normalised per task), the head
        with the per-task `weights`. Returns (output, {kernel name: probe}): the gradient with
        respect to a probe is each task's own gradient of that kernel (utils.per_task_kernel_gradient_probe)."""
        num_tasks = inp.shape[0]
        x = tf.reshape(inp, [-1, self.img_size, self.img_size, self.channels])   # tasks in the batch
        strides = self._strides()
        probes = {}
        task_channel_images, moments_of_patches = self._patch_moments.get(inp.ref(), (None, None))
        for i in range(4):
            name, bias = 'conv%d' % (i + 1), weights.get('b%d' % (i + 1))
            if i == 0 and moments_of_patches is not None:
                # Each task's own kernel (its per-task copy), the tasks in the channels; then back
                # to the tasks in the batch for the next layer's plain convolution.
                y = conv_batch_norm_relu_from_patches(task_channel_images, weights[name], bias,
                                                      self.norm_params[0]['beta'], moments_of_patches, strides,
                                                      self.config.moments_stop_gradient)
                x = from_task_channels(y, num_tasks)
                continue
            z = tf.nn.conv2d(x, self.weights[name], strides, 'SAME')
            z, probes[name] = per_task_kernel_gradient_probe(z, x, num_tasks, strides, self.grouped_conv)
            per_task = tf.reshape(z, [num_tasks, -1] + z.shape[1:].as_list())
            if bias is not None:
                per_task = per_task + tf.reshape(bias, [num_tasks, 1, 1, 1, -1])
            if self.config.norm == 'batch_norm':
                per_task = batch_norm_relu_per_task(per_task, self.norm_params[i]['beta'],
                                                    self.config.moments_stop_gradient, self.blocked_sums)
            else:
                per_task = normalize(per_task, self.config.norm, self.norm_params[i], batch_axes=[1, 2, 3],
                                     feature_axes=[2, 3, 4],
                                     stop_gradient_in_variance=self.config.moments_stop_gradient)
            x = tf.reshape(per_task, [-1] + z.shape[1:].as_list())
            if self.config.max_pool:
                x = tf.nn.max_pool2d(x, [1, 2, 2, 1], [1, 2, 2, 1], 'VALID')
        features = tf.reshape(x, [num_tasks, -1] + x.shape[1:].as_list())
        return self._conv_head(features, weights), probes

    def loss_func(self, pred, label):
        if self.classification:
            return xent(pred, label, self.config.update_batch_size)
        return mse(pred, label)

    # ---------------------------------------------------------------- MAML
    def fast_adapt(self, inputa, labela, inputb, labelb, num_steps, unrolled_steps=None):
        """Algorithm 1's inner loop for every task of the batch at once.

        Each task gets its own copy of the weights; `num_steps` gradient steps on the support set
        (a) turn them into fast weights, and after each step the query set (b) is evaluated.
        Returns (outputa, lossa, [outputb after step j], [lossb after step j]).

        The first step starts from the shared weights, so its support pass runs as plain
        convolutions over all tasks' examples (`_support_pass_from_shared_weights`); later steps
        convolve each task with its own kernels (grouped). The first `unrolled_steps` (default: all;
        for conv nets at least the first) are built one after another: the meta-gradient goes through them. The rest, which only summaries and evaluation read, run in one
        tf.while_loop, so their ops are built once instead of once per step: the graph of Omniglot's
        ten reported steps builds in a fraction of the time, and computes the same numbers.
        """
        num_tasks = inputa.shape[0]
        unrolled_steps = num_steps if unrolled_steps is None else min(unrolled_steps, num_steps)
        if self.use_conv:   # the first step runs from the shared weights (plain convolutions) in every graph
            unrolled_steps = max(unrolled_steps, min(1, num_steps))
        # The pre-update quantities need no per-task copies: one batch through the shared weights.
        outputa = self.forward(inputa, self.weights)
        lossa = self.loss_func(outputa, labela)
        fast_weights = self.weights_per_task(num_tasks)
        self._remember_patch_moments([inputa, inputb])
        outputbs, lossesb = [], []
        for step in range(unrolled_steps):
            fast_weights, outputb, lossb = self._inner_step(inputa, labela, inputb, labelb, fast_weights,
                                                            from_shared_weights=step == 0 and self.use_conv)
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
            fast_weights = self._gradient_step(self.loss_func(output, labela), fast_weights, probes)
        else:
            support_loss = self.loss_func(self.forward(inputa, fast_weights, per_task=True), labela)
            fast_weights = self._gradient_step(support_loss, fast_weights)
        outputb = self.forward(inputb, fast_weights, per_task=True)
        return fast_weights, outputb, self.loss_func(outputb, labelb)

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
        copies = {}
        for name, weight in self.weights.items():
            if self.conv_biases_cancel and name in CONV_BIASES:
                continue
            if self.use_conv and name not in ('w5', 'b5'):     # conv1..conv4, b1..b4
                copies[name] = tf.tile(weight, [1] * (weight.shape.rank - 1) + [num_tasks])
            else:
                copies[name] = tf.tile(weight[None], [num_tasks] + [1] * weight.shape.rank)
        return copies

    def _gradient_step(self, loss, weights, stand_ins=None):
        """weights - update_lr * their gradient of loss; `stand_ins`: tensors whose gradient is that of
        the weight of the same name (the first step's kernel probes)."""
        # Tasks are independent, so the gradient of the summed loss with respect to task t's copy
        # of the weights is the gradient of task t's own loss.
        stand_ins = stand_ins or {}
        grads = tf.gradients(tf.reduce_sum(loss), [stand_ins.get(k, w) for k, w in weights.items()])
        if self.config.stop_grad:
            grads = [tf.stop_gradient(g) for g in grads]   # first-order MAML
        return {k: w - self.update_lr * g for (k, w), g in zip(weights.items(), grads)}

    def construct_model(self, input_tensors=None, prefix='metatrain_'):
        """Builds the inner loop over a meta-batch, its losses, summaries and (for training) ops.

        The graph holds max(num_updates, test_num_updates) inner steps; TensorFlow runs only those
        that a fetched tensor needs, so the training op pays for num_updates steps alone.
        """
        cfg = self.config
        if input_tensors is None:
            input_tensors = self._placeholders()
        self.inputa, self.inputb = input_tensors['inputa'], input_tensors['inputb']
        self.labela, self.labelb = input_tensors['labela'], input_tensors['labelb']

        with tf1.variable_scope('model', reuse=tf1.AUTO_REUSE):
            if self.weights is None:
                with on_device(self.param_device):
                    self.weights, self.norm_params = self.construct_weights()
            num_steps = max(self.test_num_updates, cfg.num_updates)
            # Only a training graph is differentiated, through its first num_updates steps.
            unrolled_steps = cfg.num_updates if 'train' in prefix else 0
            outputa, lossa, outputbs, lossesb = self.fast_adapt_on_towers(
                self.inputa, self.labela, self.inputb, self.labelb, num_steps, unrolled_steps)

        with on_device(self.param_device):
            self._build_totals(prefix, outputa, lossa, outputbs, lossesb, num_steps)

    def fast_adapt_on_towers(self, inputa, labela, inputb, labelb, num_steps, unrolled_steps=None):
        """fast_adapt with the tasks split in equal parts over self.towers (one part per device, its
        results joined back in task order); a meta-batch that does not divide runs on the first."""
        num_tasks = inputa.shape[0]
        towers = self.towers if num_tasks % len(self.towers) == 0 else self.towers[:1]
        if len(towers) == 1:
            with on_device(towers[0]):
                return self.fast_adapt(inputa, labela, inputb, labelb, num_steps, unrolled_steps)
        parts = zip(*(tf.split(x, len(towers), axis=0) for x in (inputa, labela, inputb, labelb)))
        results = []
        for device, part in zip(towers, parts):
            with on_device(device):
                self.grouped_conv, self.fused_bn_grad = grouped_conv_supported(device), fused_bn_grad_supported(device)
                self.blocked_sums = blocked_sums_supported(device)
                results.append(self.fast_adapt(*part, num_steps, unrolled_steps))
        with on_device(self.param_device):
            outputa, lossa, outputbs, lossesb = zip(*results)
            join = lambda tensors: tf.concat(tensors, axis=0)
            return (join(outputa), join(lossa), [join(step) for step in zip(*outputbs)],
                    [join(step) for step in zip(*lossesb)])

    def _build_totals(self, prefix, outputa, lossa, outputbs, lossesb, num_steps):
        cfg = self.config
        meta_batch = float(cfg.meta_batch_size)
        total_loss1 = tf.reduce_sum(lossa) / meta_batch
        total_losses2 = [tf.reduce_sum(loss) / meta_batch for loss in lossesb]
        total_accuracy1 = total_accuracies2 = None
        if self.classification:
            total_accuracy1 = tf.reduce_sum(accuracy(outputa, self.labela)) / meta_batch
            total_accuracies2 = [tf.reduce_sum(accuracy(out, self.labelb)) / meta_batch
                                 for out in outputbs]

        if 'train' in prefix:
            self.outputas, self.outputbs = outputa, outputbs
            self.total_loss1, self.total_losses2 = total_loss1, total_losses2
            self.total_accuracy1, self.total_accuracies2 = total_accuracy1, total_accuracies2
            self._build_train_ops()
        else:
            self.metaval_outputas, self.metaval_outputbs = outputa, outputbs
            self.metaval_total_loss1, self.metaval_total_losses2 = total_loss1, total_losses2
            self.metaval_total_accuracy1 = total_accuracy1
            self.metaval_total_accuracies2 = total_accuracies2

        summaries = [tf1.summary.scalar(prefix + 'Pre-update loss', total_loss1)]
        if self.classification:
            summaries.append(tf1.summary.scalar(prefix + 'Pre-update accuracy', total_accuracy1))
        for j in range(num_steps):
            summaries.append(tf1.summary.scalar(prefix + 'Post-update loss, step ' + str(j + 1),
                                                total_losses2[j]))
            if self.classification:
                summaries.append(tf1.summary.scalar(
                    prefix + 'Post-update accuracy, step ' + str(j + 1), total_accuracies2[j]))
        setattr(self, prefix + 'summ_op', tf1.summary.merge(summaries))

    def _build_train_ops(self):
        """Pre-training (Adam on the pre-update loss) and the meta-update (Adam through the inner loop)."""
        # With towers, each op's gradient runs on that op's device: every tower differentiates its own
        # tasks, and only the weights' gradients (summed over towers) meet on param_device.
        colocate = len(self.towers) > 1
        # GATE_NONE: no tuple of Identity and NoOp operations around each operation's gradients
        # (the default's guard for ref variables, which this graph does not modify): the same values,
        # about 1,300 fewer operations to build and run for Omniglot 20-way.
        gate = tf1.train.Optimizer.GATE_NONE
        pretrain_optimizer = tf1.train.AdamOptimizer(self.meta_lr)
        if self.config.pretraining:
            self.pretrain_op = pretrain_optimizer.minimize(self.total_loss1, gate_gradients=gate,
                                                           colocate_gradients_with_ops=colocate)
        else:
            # Its variables (Adam's moments for every weight) are created all the same, so checkpoints hold
            # the same variables whatever the flags; its gradient, about 1,100 operations for Omniglot
            # 20-way, is not built. The op created here is never run. minimize() would give every
            # trainable variable moments too: the pre-update loss reaches them all (the conv biases
            # through the shared-weights pass), tests/test_checkpoints.py checks it.
            pretrain_optimizer.apply_gradients([(tf.zeros(v.shape, v.dtype.base_dtype), v)
                                                for v in tf1.trainable_variables()])
            self.pretrain_op = None
        optimizer = tf1.train.AdamOptimizer(self.meta_lr)
        self.gvs = optimizer.compute_gradients(self.total_losses2[self.config.num_updates - 1],
                                               gate_gradients=gate, colocate_gradients_with_ops=colocate)
        if self.conv_biases_cancel:   # exact zeros, not None: Adam keeps its slots (checkpoints unchanged)
            biases = {self.weights[name].ref() for name in CONV_BIASES}
            self.gvs = [(tf.zeros_like(v) if g is None and v.ref() in biases else g, v) for g, v in self.gvs]
        gvs = self.gvs
        if self.config.datasource == 'miniimagenet':
            gvs = [(tf.clip_by_value(g, -MINIIMAGENET_GRAD_CLIP, MINIIMAGENET_GRAD_CLIP), v)
                   for g, v in gvs]
        self.metatrain_op = optimizer.apply_gradients(gvs)

    def _placeholders(self):
        shape = [self.config.meta_batch_size, None]
        return {'inputa': tf1.placeholder(tf.float32, shape + [self.dim_input], name='inputa'),
                'inputb': tf1.placeholder(tf.float32, shape + [self.dim_input], name='inputb'),
                'labela': tf1.placeholder(tf.float32, shape + [self.dim_output], name='labela'),
                'labelb': tf1.placeholder(tf.float32, shape + [self.dim_output], name='labelb')}


def on_device(device):
    """tf.device(device), or no change of placement for None."""
    return tf.device(device) if device else contextlib.nullcontext()


def _unnamed(index):
    """The name TF1 gave the index-th unnamed tf.Variable of a scope."""
    return 'Variable' if index == 0 else 'Variable_%d' % index


def _fc_norm_scope(layer):
    """The reference scoped the fully connected net's norms '0', '2', '3', ...: layer i>0 is i+1."""
    return '0' if layer == 0 else str(layer + 1)


def _dense(x, weight, bias):
    """x [tasks, examples, d] times a shared [d, h] or per-task [tasks, d, h] weight, plus bias."""
    if weight.shape.rank == 2:
        return tf.tensordot(x, weight, [[2], [0]]) + bias
    return tf.matmul(x, weight) + bias[:, None, :]
