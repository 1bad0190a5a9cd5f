"""What one meta-update executes with the fast paths: the inner steps it needs, and nothing the
summaries alone need.

The training graph holds max(num_updates, test_num_updates) inner steps (10 for Omniglot) so the
summaries can report every step. The reference computed all of them on every iteration (and so does
the plain definition, --fast_paths=off); with the fast paths the training op must run only the
num_updates steps its meta-gradient goes through. Checked on what
TensorFlow actually runs (a traced session run), counting the convolutions with the functions
bench/bench_conv_floor.py times them with.
"""
import collections
import functools

import pytest
import tensorflow as tf

from bench.bench_conv_floor import build_training_graph, conv_flops, convolutions_run_by, runs_plain
from fast_paths import Capabilities

tf1 = tf.compat.v1
TASKS = 2
EXAMPLES = TASKS * 5   # 5-way 1-shot: the support (and query) examples of all tasks


@functools.lru_cache(maxsize=None)   # each graph is built and traced once for all the tests
def convolutions(num_updates, test_num_updates, fetch_last_step=False, stop_grad=False):
    """Counter of the convolutions one run of the training op (and the last step's loss) executes."""
    config = dict(num_classes=5, meta_batch_size=TASKS, update_batch_size=1, update_lr=0.4,
                  num_updates=num_updates, stop_grad=stop_grad)
    graph, model = build_training_graph(config, test_num_updates)
    with tf1.Session(graph=graph) as sess:
        sess.run(tf1.global_variables_initializer())
        fetch = [model.metatrain_op] + ([model.total_losses2[-1]] if fetch_last_step else [])
        return collections.Counter(convolutions_run_by(sess, fetch, EXAMPLES))


@pytest.mark.parametrize('num_updates', [1, pytest.param(2, marks=pytest.mark.slow)])
def test_meta_update_runs_only_the_inner_steps_it_needs(num_updates):
    needed = convolutions(num_updates, test_num_updates=num_updates)
    in_graph_of_ten = convolutions(num_updates, test_num_updates=10)
    reporting_all_ten = convolutions(num_updates, test_num_updates=10, fetch_last_step=True)
    assert in_graph_of_ten == needed
    # The extra steps are in the graph and run when a summary asks for them.
    assert sum(reporting_all_ten.values()) > sum(needed.values())


def test_convolutions_of_one_step_meta_update():
    # 4 layers. First order: support forward, filter and input gradients (the inner step), then
    # query forward, filter and input gradients: 4 + 4 + 3 + 4 + 4 + 3 = 22, since nothing needs
    # the gradient with respect to the images. Second order adds 20 for the differentiated inner
    # step: 42. Without grouped convolution (oneDNN off) every task has its own convolutions where
    # the kernels differ.
    # The first step's convolutions with the shared kernels run plain whatever the CPU (7 of first
    # order's 22, 20 of second order's 42).
    per_task_op = 1 if Capabilities.of().grouped_conv else TASKS
    first_order = convolutions(1, test_num_updates=10, stop_grad=True)
    second_order = convolutions(1, test_num_updates=10)
    assert sum(first_order.values()) == 7 + 15 * per_task_op
    assert sum(second_order.values()) == 20 + 22 * per_task_op


def test_flop_count_of_the_convolutions_run():
    """bench_conv_floor's arithmetic bound counts every output value's kernel-sized dot product,
    padding 'SAME' (stride 2 rounds the output up), grouped or plain: each of a layer's
    convolutions (forward, filter or input gradient, of any order) does its forward pass's
    arithmetic for all tasks' examples."""
    # 28x28 images, stride 2: layer outputs 14, 7, 4, 2 wide; 3 * 3 * channels products per output value
    layer_flops = {28: 2 * EXAMPLES * 14 * 14 * 9 * 1 * 64, 14: 2 * EXAMPLES * 7 * 7 * 9 * 64 * 64,
                   7: 2 * EXAMPLES * 4 * 4 * 9 * 64 * 64, 4: 2 * EXAMPLES * 2 * 2 * 9 * 64 * 64}
    second_order = convolutions(1, test_num_updates=10)
    kinds = set()
    for conv, count in second_order.items():
        (batch, height, _, channels_all), channels = conv[1], conv[2][2]
        # a share of all tasks' examples: grouped (tasks in the channels), plain, or one task's (oneDNN off)
        share = batch * (channels_all // channels) / EXAMPLES
        assert conv_flops(conv[:4]) == layer_flops[height] * share, conv
        kinds.add((conv[0], runs_plain(conv, EXAMPLES)))
    assert ('Conv2DBackpropFilter', False) in kinds and ('Conv2D', True) in kinds   # both forms counted
    grouped = ('Conv2DBackpropFilter', (5, 7, 7, 2 * 64), (3, 3, 64, 2 * 64), (1, 2, 2, 1))
    assert conv_flops(grouped) == 2 * (2 * 5 * 4 * 4 * 9 * 64 * 64)   # both tasks' filter gradients


def could_be_plain_count(counter):
    return sum(count for conv, count in counter.items() if conv[-1])


def runs_plain_count(counter):
    return sum(count for conv, count in counter.items() if runs_plain(conv, EXAMPLES))


def test_the_first_steps_shared_kernel_convolutions_run_plain():
    # Second order: of the first inner step, the support forward (4) and input gradients (3) use
    # the shared kernels, and so do their derivatives in the meta-gradient: those of the input
    # gradients (3 + 3) and of the forward (3 input, 4 filter gradients, summed over tasks): 20 of
    # 42, and all 20 run as one plain convolution over every task's examples. First order: the
    # support forward and input gradients run plain (7); the query pass's filter gradients (4), which
    # only the shared weights' gradient reads, could too: 11 of 22.
    # Where the first layer's batch norm comes from its input's patches (oneDNN), that layer's kernel
    # is scaled per task (fast_paths.conv_batch_norm_relu_from_patches): its forward pass, and in second
    # order the forward's filter gradient, run grouped, 2 fewer plain; in first order the query
    # pass's filter gradient of that layer is no longer one the shared weights' gradient alone reads.
    second_order = convolutions(1, test_num_updates=10)
    first_order = convolutions(1, test_num_updates=10, stop_grad=True)
    # Without grouped convolution (oneDNN off) the others are one convolution per task.
    can = Capabilities.of()
    per_task_op = 1 if can.grouped_conv else TASKS
    first_layer = 1 if can.first_layer_from_patches else 0
    assert runs_plain_count(second_order) == could_be_plain_count(second_order) == 20 - 2 * first_layer
    assert runs_plain_count(first_order) == 7 - first_layer
    assert could_be_plain_count(first_order) == 7 - first_layer + (4 - first_layer) * per_task_op
    # A second inner step starts from per-task weights: nothing of it is shared.
    assert could_be_plain_count(convolutions(2, test_num_updates=2)) == 20 - 2 * first_layer


def test_steps_nothing_differentiates_are_one_loop_with_the_unrolled_numbers():
    """Inner steps past the differentiated ones run in one tf.while_loop: the graph holds one copy of
    a step, not one per step, and every step's query output and loss equal those of the unrolled
    steps (same weights, same inputs)."""
    import numpy as np
    from maml import MAML, ModelConfig
    config = ModelConfig(datasource='omniglot', num_classes=5, meta_batch_size=TASKS, update_batch_size=1,
                         update_lr=0.4, num_updates=1, num_filters=8)
    steps = 6
    with tf.Graph().as_default() as graph:
        tf1.set_random_seed(0)
        model = MAML(config, 784, 5, test_num_updates=steps)
        model.construct_model(prefix='metaval_')     # builds the weights; evaluation: all steps in the loop
        inputs = (model.inputa, model.labela, model.inputb, model.labelb)
        ops_before = len(graph.get_operations())
        fast = model.fast_paths[0]
        looped = fast.meta_batch(*inputs, steps, unrolled_steps=1)
        ops_looped = len(graph.get_operations()) - ops_before
        unrolled = fast.meta_batch(*inputs, steps)
        ops_unrolled = len(graph.get_operations()) - ops_before - ops_looped
        assert ops_looped < 0.5 * ops_unrolled
        rng = np.random.RandomState(0)
        labels = np.tile(np.eye(5, dtype=np.float32), (TASKS, 1, 1))
        feed = {model.inputa: rng.rand(TASKS, 5, 784), model.inputb: rng.rand(TASKS, 5, 784),
                model.labela: labels, model.labelb: labels}
        with tf1.Session() as sess:
            sess.run(tf1.global_variables_initializer())
            got_looped, got_unrolled, got_metaval = sess.run(
                [looped[2:], unrolled[2:], [model.metaval_outputbs, model.metaval_total_losses2]], feed)
    for name, got in (('loop after one unrolled step', got_looped), ('evaluation graph', got_metaval)):
        for j in range(steps):
            np.testing.assert_allclose(got[0][j], got_unrolled[0][j], rtol=1e-5, atol=1e-6, err_msg=name)
        if name != 'evaluation graph':
            np.testing.assert_allclose(np.array(got[1]), np.array(got_unrolled[1]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_metaval[1], np.array(got_unrolled[1]).reshape(steps, -1).sum(axis=1) / TASKS, rtol=1e-5)


def test_cross_entropy_on_known_shapes_is_the_wrappers_kernel_with_fewer_operations():
    """fast_paths.xent_per_task calls the softmax cross-entropy kernel on the flattened shape known when
    the graph is built: the same loss and first and second derivatives as utils.xent (the wrapper
    tf.nn.softmax_cross_entropy_with_logits), bit for bit, from fewer operations."""
    import numpy as np
    from fast_paths import xent_per_task as xent
    from utils import xent as plain_xent
    rng = np.random.RandomState(0)
    logits = rng.randn(3, 4, 5).astype(np.float32)
    labels = np.eye(5, dtype=np.float32)[rng.randint(5, size=(3, 4))]
    weights, directions = rng.rand(3, 4).astype(np.float32), rng.randn(3, 4, 5).astype(np.float32)
    results, op_counts = [], []
    for loss_of in (lambda pred, label: xent(pred, label, 2),
                    lambda pred, label: plain_xent(pred, label, 2)):
        with tf.Graph().as_default() as graph:
            pred = tf.constant(logits)
            ops_before = len(graph.get_operations())
            loss = loss_of(pred, tf.constant(labels))
            op_counts.append(len(graph.get_operations()) - ops_before)
            first = tf.gradients(tf.reduce_sum(loss * weights), pred)[0]
            second = tf.gradients(tf.reduce_sum(first * directions), pred)[0]
            with tf1.Session() as sess:
                results.append(sess.run([loss, first, second]))
    for name, got, want in zip(['loss', 'first derivative', 'second derivative'], *results):
        assert got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)
    assert op_counts[0] < op_counts[1] / 2, op_counts
