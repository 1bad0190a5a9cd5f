"""What one meta-update executes: the inner steps it needs, and nothing the summaries alone need.

The training graph holds max(num_updates, test_num_updates) inner steps (10 for Omniglot) so the
summaries can report every step. The reference computed all of them on every iteration; here the
training op must run only the num_updates steps its meta-gradient goes through. Checked on what
TensorFlow actually runs (a traced session run), counting the convolutions with the functions
bench/bench_conv_floor.py times them with.
"""
import collections

import pytest
import tensorflow as tf

from bench.bench_conv_floor import build_training_graph, convolutions_run_by
from utils import grouped_conv_supported

tf1 = tf.compat.v1
TASKS = 2


def convolutions(num_updates, test_num_updates, fetch_last_step=False, stop_grad=False):
    """Counter of the convolutions one run of the training op (and the last step's loss) executes."""
    config = dict(num_classes=5, meta_batch_size=TASKS, update_batch_size=1, update_lr=0.4,
                  num_updates=num_updates, stop_grad=stop_grad)
    graph, model = build_training_graph(config, test_num_updates)
    with tf1.Session(graph=graph) as sess:
        sess.run(tf1.global_variables_initializer())
        fetch = [model.metatrain_op] + ([model.total_losses2[-1]] if fetch_last_step else [])
        return collections.Counter(convolutions_run_by(sess, fetch))


@pytest.mark.parametrize('num_updates', [1, 2])
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
    # step: 42. Without grouped convolution (oneDNN off) every task has its own convolutions.
    per_layer_op = 1 if grouped_conv_supported() else TASKS
    first_order = convolutions(1, test_num_updates=10, stop_grad=True)
    second_order = convolutions(1, test_num_updates=10)
    assert sum(first_order.values()) == 22 * per_layer_op
    assert sum(second_order.values()) == 42 * per_layer_op
