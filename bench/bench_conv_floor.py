"""How fast one Omniglot meta-iteration could be on this machine: the convolutions' floor.

    python bench/bench_conv_floor.py [omniglot5 omniglot20 omniglot5_first_order] [--reference_ms MS]

Builds the training graph of the paper's command (random inputs: no data needed), lists every
convolution that one traced meta-update runs (forward, backprop-input, backprop-filter, and those of
the second-order pass), and times each one alone at its real shape: as the graph runs it (one
plain convolution where every task has the same kernel, else each task with its own kernel: a
grouped convolution) and as one plain convolution with the tasks in the batch. The latter does the
same arithmetic in the fastest form oneDNN offers here, so its sum bounds from below any
implementation that computes the same exact meta-gradient in float32. All-plain is a bound, not a
design: a convolution can run plain only where every task uses the same kernel (the first inner
step's support pass from the shared weights, its input gradients, and their second derivatives:
those already run plain) or where a filter gradient is summed over the tasks anyway (one that
flows only into the shared weights' gradient). The "mixed" column times all of those plain and the
rest grouped. Also prints the measured time of the whole meta-update for comparison, and with
--reference_ms (the reference's ms per meta-iteration, from bench_side_by_side on this machine) the
target of 0.45x it. oneDNN is on, as main.py turns it on for image data (TF_ENABLE_ONEDNN_OPTS=0
turns it off: one convolution per task).

Below every implementation, whatever its form: the arithmetic. The script counts the convolutions'
floating-point operations per meta-update and measures one core's float32 peak (a large matrix
product on one thread, oneDNN's best case), and prints the time those operations take at that peak
on all usable cores: no float32 implementation of the same meta-update can run its convolutions
faster on this machine.
"""
import argparse
import collections
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
if __name__ == '__main__':   # as main.py does for image data (before TF is imported); not when a test imports this
    os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '1')
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from devices import usable_cores  # noqa: E402
from maml import MAML, ModelConfig  # noqa: E402

tf1 = tf.compat.v1
CONV_OPS = ('Conv2D', 'Conv2DBackpropInput', 'Conv2DBackpropFilter')
CONFIGS = {   # the paper's commands
    'omniglot5': dict(num_classes=5, meta_batch_size=32, update_batch_size=1, update_lr=0.4, num_updates=1),
    'omniglot20': dict(num_classes=20, meta_batch_size=16, update_batch_size=1, update_lr=0.1, num_updates=5),
    # First-order MAML (--stop_grad=True) does a subset of second-order MAML's convolutions.
    'omniglot5_first_order': dict(num_classes=5, meta_batch_size=32, update_batch_size=1, update_lr=0.4,
                                  num_updates=1, stop_grad=True),
}
TARGET_RATIO = 0.45   # issue 10: the port at most 0.45x the reference as shipped


def median_ms(sess, fetch, runs):
    for _ in range(3):
        sess.run(fetch)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(fetch)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def build_training_graph(config, test_num_updates=10, towers=None, param_device=None):
    """The Omniglot model of `config` (ModelConfig fields) on fixed random inputs: (graph, MAML).
    `towers`, `param_device`: as MAML takes them (devices.py)."""
    graph = tf.Graph()
    with graph.as_default(), tf.device(param_device):
        cfg = ModelConfig(datasource='omniglot', **config)
        n = cfg.num_classes * cfg.update_batch_size
        rng = np.random.RandomState(0)
        # Variables, not constants: read every step as data from a pipeline is (constants may be folded).
        fixed = lambda value: tf1.Variable(value, trainable=False)
        images = lambda: fixed(rng.rand(cfg.meta_batch_size, n, 784).astype(np.float32))
        labels = fixed(np.eye(cfg.num_classes, dtype=np.float32)[rng.randint(0, cfg.num_classes, (cfg.meta_batch_size, n))])
        model = MAML(cfg, 784, cfg.num_classes, test_num_updates=test_num_updates, towers=towers,
                     param_device=param_device)
        model.construct_model({'inputa': images(), 'inputb': images(), 'labela': labels, 'labelb': labels})
    return graph, model


def convolutions_run_by(sess, fetch, all_examples):
    """(kind, input-side shape, kernel shape, strides, could_be_plain) of every convolution one run
    of `fetch` executes, read from a traced run (so what grappler pruned is not counted).
    all_examples: the number of support (or query) examples of all tasks together, the batch of a
    convolution that runs plain."""
    options = tf1.RunOptions(trace_level=tf1.RunOptions.FULL_TRACE)
    metadata = tf1.RunMetadata()
    sess.run(fetch, options=options, run_metadata=metadata)
    graph, convs = sess.graph, []
    needed = ancestors(fetch)
    for device in metadata.step_stats.dev_stats:
        for node in device.node_stats:
            kernel = node.timeline_label.split(' = ')[-1].split('(')[0]
            if 'Conv2D' not in kernel:
                continue
            op = traced_operation(graph, node.node_name)
            if op.type not in CONV_OPS:   # conv + bias (+ ReLU) fused by grappler, named after the last
                op = fused_convolution(op)
            convs.append(describe(op) + (could_be_plain(op, needed, all_examples),))
    return convs


def fused_convolution(op):
    """The convolution of a fusion grappler named after its last operation: conv + bias (+ ReLU)."""
    for _ in range(2):
        op = next((t.op for t in op.inputs if t.op.type in CONV_OPS), None) or op.inputs[0].op
        if op.type in CONV_OPS:
            return op
    raise ValueError('no convolution behind fused operation {}'.format(op.name))


# Ops a gradient passes through on its way to the shared weights' gradient
# (ConcatV2: the tasks' gradients joined, without grouped convolution).
PASS_THROUGH = ('Identity', 'AddN', 'AddV2', 'Add', 'Reshape', 'Neg', 'ConcatV2')


def ancestors(fetch):
    """The operations whose values `fetch` (operations or tensors, nested) needs, themselves
    included. Control inputs count only on groups (NoOp): tf.gradients puts every gradient of a
    node behind control dependencies on all its others, including those nothing reads."""
    seen = set()
    todo = [getattr(item, 'op', item) for item in tf.nest.flatten(fetch)]
    while todo:
        op = todo.pop()
        if op not in seen:
            seen.add(op)
            todo.extend(t.op for t in op.inputs)
            if op.type == 'NoOp':
                todo.extend(op.control_inputs)
    return seen


def runs_plain(conv, all_examples):
    """Whether convolution `conv` (describe's shapes) runs as one plain convolution: all tasks'
    examples in its batch, one kernel (not a grouped one, nor one task's piece of the batch)."""
    _, x, kernel, _ = conv[:4]
    return x[0] == all_examples and x[-1] == kernel[2]


def could_be_plain(op, needed, all_examples):
    """Whether `op` runs, or could run, as one plain convolution: its kernel is the same for every
    task (the shared weights, or their tiled copies), or, for a filter gradient, its output only
    reaches the shared weights' gradient (the sum over tasks that Tile's gradient takes). `needed`:
    the operations the fetch depends on; paths through any other are dead."""
    if runs_plain(describe(op), all_examples):
        return True
    if op.type != 'Conv2DBackpropFilter':
        kernel = op.inputs[1].op
        while kernel.type in ('Identity', 'Split'):   # Split: one task's kernel, without grouped convolution
            kernel = kernel.inputs[-1 if kernel.type == 'Split' else 0].op
        return kernel.type in ('Tile', 'ReadVariableOp')   # ReadVariableOp: the shared weights themselves
    return _reaches_only_tile_gradient(op.outputs[0], needed)


def _reaches_only_tile_gradient(tensor, needed):
    consumers = [c for c in tensor.consumers() if c in needed]
    if not consumers:
        return False
    for consumer in consumers:
        if '/Tile' in consumer.name and '_grad/' in consumer.name:
            continue
        if consumer.type not in PASS_THROUGH or not all(_reaches_only_tile_gradient(t, needed)
                                                        for t in consumer.outputs):
            return False
    return True


def traced_operation(graph, name):
    """The operation a traced node ran: one of `graph`'s, or one of a while loop's body (its nodes
    run as '<loop>/body/_<n>/<name in the body>', the body being a function of the graph)."""
    if '/body/_' not in name:
        return graph.get_operation_by_name(name)
    loop_name, rest = name.split('/body/_', 1)
    body = graph._get_function(graph.get_operation_by_name(loop_name).get_attr('body').name).graph   # noqa: SLF001
    return traced_operation(body, rest.split('/', 1)[1])


def describe(node):
    """The convolution's shapes as (kind, x [batch, H, W, C_all], kernel [3, 3, C, F_all], strides)."""
    if node.type == 'Conv2D':
        x, kernel = node.inputs[0].shape, node.inputs[1].shape
    elif node.type == 'Conv2DBackpropInput':
        x, kernel = node.outputs[0].shape, node.inputs[1].shape
    else:
        x, kernel = node.inputs[0].shape, node.outputs[0].shape
    return node.type, tuple(x.as_list()), tuple(kernel.as_list()), tuple(node.get_attr('strides'))


def conv_flops(conv):
    """Floating-point operations (a multiply and an add each) of one convolution as describe()
    gives it, padding 'SAME': every output value of each kernel's kh * kw * C products. A
    convolution's filter and input gradients do the same arithmetic as its forward pass."""
    _, (batch, height, width, _), (kh, kw, channels, filters_all), strides = conv[:4]
    out_height, out_width = -(-height // strides[1]), -(-width // strides[2])
    return 2 * batch * out_height * out_width * kh * kw * channels * filters_all


def core_peak_gflops(size=1536, runs=10):
    """One core's float32 peak here, in GFLOP/s: the median of a size x size matrix product on one
    thread (oneDNN's matrix product, its best case: in cache, no layout changes). Measured in a new
    process: a process's first session fixes the threads of every later one."""
    code = ('import bench_conv_floor as b; print(b._matmul_gflops_one_thread({}, {}))'.format(size, runs))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
    out = subprocess.run([sys.executable, '-c', code], cwd=str(Path(__file__).resolve().parent), env=env,
                         capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def _matmul_gflops_one_thread(size, runs):
    graph = tf.Graph()
    with graph.as_default():
        a, b = (tf.Variable(tf.random.uniform([size, size])) for _ in range(2))
        product = tf.matmul(a, b)
        config = tf1.ConfigProto(intra_op_parallelism_threads=1, inter_op_parallelism_threads=1)
        with tf1.Session(graph=graph, config=config) as sess:
            sess.run(tf1.global_variables_initializer())
            return 2 * size ** 3 / median_ms(sess, product.op, runs) / 1e6


def time_convolution(kind, x_shape, kernel_shape, strides, plain, runs=20):
    """Milliseconds of one convolution alone, as the graph runs it (grouped or plain) or as one plain convolution."""
    batch, height, width, channels_all = x_shape
    kh, kw, channels, filters_all = kernel_shape
    groups = channels_all // channels
    if plain:   # the tasks (groups) move into the batch; the arithmetic is the same
        batch, channels_all, filters_all = batch * groups, channels, filters_all // groups
    graph = tf.Graph()
    with graph.as_default():
        x = tf.Variable(tf.random.uniform([batch, height, width, channels_all]))
        kernel = tf.Variable(tf.random.uniform([kh, kw, channels, filters_all]))
        y = tf.nn.conv2d(x, kernel, list(strides), 'SAME')
        dy = tf.Variable(tf.random.uniform(y.shape))
        if kind == 'Conv2D':
            out = y
        elif kind == 'Conv2DBackpropInput':
            out = tf1.nn.conv2d_backprop_input(x.shape, kernel, dy, list(strides), 'SAME')
        else:
            out = tf1.nn.conv2d_backprop_filter(x, kernel.shape, dy, list(strides), 'SAME')
        with tf1.Session(graph=graph) as sess:
            sess.run(tf1.global_variables_initializer())
            return median_ms(sess, out.op, runs)


def report(name, reference_ms=None):
    config = CONFIGS[name]
    graph, model = build_training_graph(config)
    train_op = model.metatrain_op
    with tf1.Session(graph=graph) as sess:
        sess.run(tf1.global_variables_initializer())
        step_ms = median_ms(sess, train_op, 5 if name == 'omniglot20' else 20)
        all_examples = config['meta_batch_size'] * config['num_classes'] * config['update_batch_size']
        counts = collections.Counter(convolutions_run_by(sess, train_op, all_examples))
    # count, how many run plain, how many could be plain, ms as run, ms all plain, ms mixed
    by_kind = collections.defaultdict(lambda: [0, 0, 0, 0.0, 0.0, 0.0])
    for (*conv, could_be_plain_here), count in counts.items():
        as_run_ms = time_convolution(*conv, plain=False)
        plain_ms = time_convolution(*conv, plain=True)
        entry = by_kind[conv[0]]
        entry[0] += count
        entry[1] += count if runs_plain(conv, all_examples) else 0
        entry[2] += count if could_be_plain_here else 0
        entry[3] += count * as_run_ms
        entry[4] += count * plain_ms
        entry[5] += count * (plain_ms if could_be_plain_here else as_run_ms)
    print('{}: {} convolutions per meta-update'.format(name, sum(counts.values())))
    for kind, (count, plain_now, plain_count, as_run_ms, plain_ms, mixed_ms) in sorted(by_kind.items()):
        print('  {:<22s} x{:<3d} ({:2d} run plain, {:2d} could) alone: {:7.1f} ms as run, {:7.1f} ms plain, '
              '{:7.1f} ms mixed'.format(kind, count, plain_now, plain_count, as_run_ms, plain_ms, mixed_ms))
    as_run_total, plain_total, mixed_total = (sum(v[i] for v in by_kind.values()) for i in (3, 4, 5))
    gflop = sum(conv_flops(conv) * count for conv, count in counts.items()) / 1e9
    peak, cores = core_peak_gflops(), usable_cores()
    bound_ms = 1000 * gflop / (peak * cores)
    print('  arithmetic: {:.1f} GFLOP of convolutions per meta-update, {:.1f} GFLOP/s as run alone (all cores); '
          "one core's float32 peak {:.0f} GFLOP/s, so at least {:.1f} ms on {} core{}{}".format(
              gflop, gflop / as_run_total * 1000, peak, bound_ms, cores, 's' * (cores != 1),
              ' ({:.2f}x the reference)'.format(bound_ms / reference_ms) if reference_ms else ''))
    print('  convolutions alone: {:.1f} ms as run, {:.1f} ms mixed (plain wherever the kernel is shared or '
          'the filter gradient summed), {:.1f} ms all plain (the bound)'.format(as_run_total, mixed_total, plain_total))
    comparison = ' | reference {:.1f} ms, target ({}x) {:.1f} ms'.format(
        reference_ms, TARGET_RATIO, TARGET_RATIO * reference_ms) if reference_ms else ''
    print('  whole meta-update: {:.1f} ms measured; with the mixed convolutions and the rest as now '
          '(if no layout change cost anything): {:.1f} ms{}'.format(step_ms, step_ms - as_run_total + mixed_total,
                                                                   comparison))
    sys.stdout.flush()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('configs', nargs='*', help='any of {} (default: all)'.format(', '.join(CONFIGS)))
    parser.add_argument('--reference_ms', type=float, default=None,
                        help="the reference's ms per meta-iteration on this machine (bench_side_by_side), "
                             "to print the target; one configuration only")
    args = parser.parse_args()
    names = args.configs or list(CONFIGS)
    if args.reference_ms is not None and len(names) != 1:
        parser.error('--reference_ms is the figure of one configuration: name exactly one')
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        parser.error('unknown configuration {}: choose from {}'.format(', '.join(unknown), ', '.join(CONFIGS)))
    for name in names:
        report(name, args.reference_ms)


if __name__ == '__main__':
    main()
