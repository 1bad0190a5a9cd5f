"""Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, ICML 2017) as a TF1-style graph.

The definition, laid out as the reference's maml.py: the weights (`construct_weights`), the network
for one task (`forward_conv`: four `conv_block`s and a dense head; `forward_fc`), Algorithm 1's inner
loop for one task (`fast_adapt`), the meta-batch (`meta_batch`: tf.map_fn over the tasks, as the
reference's `task_metalearn`), and the outer loop (`construct_model`: Adam on the query loss after the
inner steps, differentiated through them). Plain TensorFlow operations and autodiff.

`ModelConfig.fast_paths` ('auto', the default) lets fast_paths.py compute the same meta-batch faster
where it was measured to pay, for the paper's networks only (it checks that the network below is the
one it was written for, and otherwise steps aside and says so); 'off' runs this file's definition.
`MAML` takes plain values (`ModelConfig`), never command-line flags.
"""
import contextlib
import dataclasses

import numpy as np
import tensorflow as tf

import fast_paths
import special_grads  # noqa: F401  (second derivative of max pooling where TF lacks one)
from utils import accuracy, conv_block, make_norm_params, mse, normalize, xent

tf1 = tf.compat.v1

FC_HIDDEN_SINUSOID = [40, 40]
FC_HIDDEN_IMAGES = [256, 128, 64, 64]
MINIIMAGENET_GRAD_CLIP = 10.0
FAST_PATHS = ('auto', 'off')


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
    fast_paths: str = 'auto'   # 'off': this file's plain definition; 'auto': fast_paths.py where it pays

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
        if config.fast_paths not in FAST_PATHS:
            raise ValueError('fast_paths must be one of {}, not {!r}'.format(FAST_PATHS, config.fast_paths))
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
        self.fast_paths = None   # per tower: a fast_paths.FastPaths, or None for the plain definition

    # ---------------------------------------------------------------- weights
    def construct_weights(self):
        """Creates the variables with the reference's names, so its checkpoints restore."""
        if self.use_conv:
            return self.construct_conv_weights()
        return self.construct_fc_weights()

    def construct_fc_weights(self):
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

    def construct_conv_weights(self):
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

    # ---------------------------------------------------------------- the network, for one task
    def forward(self, inp, weights):
        """The network on one task's examples, inp [examples, dim] -> [examples, dim_output]."""
        if self.use_conv:
            return self.forward_conv(inp, weights)
        return self.forward_fc(inp, weights)

    def forward_fc(self, inp, weights):
        hidden = inp
        for i in range(len(self.dim_hidden)):
            hidden = normalize(tf.matmul(hidden, weights['w%d' % (i + 1)]) + weights['b%d' % (i + 1)],
                               self.config.norm, self.norm_params[i], self.config.moments_stop_gradient)
        last = len(self.dim_hidden) + 1
        return tf.matmul(hidden, weights['w%d' % last]) + weights['b%d' % last]

    def forward_conv(self, inp, weights):
        x = tf.reshape(inp, [-1, self.img_size, self.img_size, self.channels])
        for i in range(4):
            x = conv_block(x, weights['conv%d' % (i + 1)], weights['b%d' % (i + 1)], self.config.norm,
                           self.norm_params[i], self.config.max_pool, self.config.moments_stop_gradient)
        if self.config.datasource == 'miniimagenet':
            x = tf.reshape(x, [-1, int(np.prod(x.shape[1:]))])
        else:
            x = tf.reduce_mean(x, [1, 2])
        return tf.matmul(x, weights['w5']) + weights['b5']

    def loss_func(self, pred, label):
        if self.classification:
            return xent(pred, label, self.config.update_batch_size)
        return mse(pred, label)

    # ---------------------------------------------------------------- MAML
    def fast_adapt(self, inputa, labela, inputb, labelb, num_steps):
        """Algorithm 1's inner loop for one task: `num_steps` gradient steps on its support set (a),
        from the shared weights, the query set (b) evaluated after each.

        Returns (outputa, lossa, [outputb after step j], [lossb after step j]).
        """
        outputa = self.forward(inputa, self.weights)
        lossa = self.loss_func(outputa, labela)
        fast_weights, support_loss = self.weights, lossa
        outputbs, lossesb = [], []
        for step in range(num_steps):
            if step > 0:
                support_loss = self.loss_func(self.forward(inputa, fast_weights), labela)
            fast_weights = self.gradient_step(support_loss, fast_weights)
            outputb = self.forward(inputb, fast_weights)
            outputbs.append(outputb)
            lossesb.append(self.loss_func(outputb, labelb))
        return outputa, lossa, outputbs, lossesb

    def gradient_step(self, loss, weights):
        """weights - update_lr * the gradient of the support loss; first order (--stop_grad) treats
        that gradient as a constant in the meta-gradient."""
        grads = tf.gradients(loss, list(weights.values()))
        if self.config.stop_grad:
            grads = [tf.stop_gradient(g) for g in grads]
        return {k: w - self.update_lr * g for (k, w), g in zip(weights.items(), grads)}

    def meta_batch(self, inputa, labela, inputb, labelb, num_steps):
        """fast_adapt for every task of a meta-batch [tasks, examples, dim], as the reference does it:
        tf.map_fn over the tasks. Returns fast_adapt's four results with a leading task axis."""
        def task(elems):
            return self.fast_adapt(*elems, num_steps)
        out_type = tf.TensorSpec(None, tf.float32)
        signature = (out_type, out_type, [out_type] * num_steps, [out_type] * num_steps)
        return tf.map_fn(task, (inputa, labela, inputb, labelb), fn_output_signature=signature,
                         parallel_iterations=int(inputa.shape[0]))

    def construct_model(self, input_tensors=None, prefix='metatrain_'):
        """Builds the inner loop over a meta-batch, its losses, summaries and (for training) ops.

        The graph holds max(num_updates, test_num_updates) inner steps; the meta-gradient goes
        through the first num_updates.
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
                self.fast_paths = fast_paths.choose(self)
            num_steps = max(self.test_num_updates, cfg.num_updates)
            # Only a training graph is differentiated, through its first num_updates steps.
            differentiated_steps = cfg.num_updates if 'train' in prefix else 0
            outputa, lossa, outputbs, lossesb = self.meta_batch_on_towers(
                self.inputa, self.labela, self.inputb, self.labelb, num_steps, differentiated_steps)

        with on_device(self.param_device):
            self._build_totals(prefix, outputa, lossa, outputbs, lossesb, num_steps)

    def meta_batch_on_towers(self, inputa, labela, inputb, labelb, num_steps, differentiated_steps):
        """meta_batch with the tasks split in equal parts over self.towers (one part per device, its
        results joined back in task order; a meta-batch that does not divide runs on the first), each
        part by that tower's fast path where there is one."""
        num_tasks = inputa.shape[0]
        count = len(self.towers) if num_tasks % len(self.towers) == 0 else 1
        parts = zip(*(tf.split(x, count, axis=0) for x in (inputa, labela, inputb, labelb)))
        results = []
        for device, fast, part in zip(self.towers, self.fast_paths, parts):
            with on_device(device):
                if fast is None:
                    results.append(self.meta_batch(*part, num_steps))
                else:
                    results.append(fast.meta_batch(*part, num_steps, differentiated_steps))
        if count == 1:
            return results[0]
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
            # 20-way, is not built. The op created here is never run.
            pretrain_optimizer.apply_gradients([(tf.zeros(v.shape, v.dtype.base_dtype), v)
                                                for v in tf1.trainable_variables()])
            self.pretrain_op = None
        optimizer = tf1.train.AdamOptimizer(self.meta_lr)
        gvs = optimizer.compute_gradients(self.total_losses2[self.config.num_updates - 1],
                                          gate_gradients=gate, colocate_gradients_with_ops=colocate)
        # A weight the meta-loss does not reach (the conv biases before batch norm, where a fast path
        # leaves them out of the inner loop: batch norm cancels them) gets exact zeros, so that Adam
        # keeps its slots and checkpoints hold the same variables either way.
        self.gvs = [(tf.zeros_like(v) if g is None else g, v) for g, v in gvs]
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
