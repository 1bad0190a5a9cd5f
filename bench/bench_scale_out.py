"""What splitting the meta-batch costs: towers on local devices and a loopback cluster, against
one device, on this machine; and what crosses the wire per meta-iteration.

    python bench/bench_scale_out.py [omniglot5 omniglot20] [--rounds 3] [--runs 10]

For each configuration (the paper's command; random inputs, no data needed) it builds the training
graph three ways: on one device, as two towers on two logical CPU devices of this process, and as
two towers on two worker processes on 127.0.0.1 (gRPC), the chief holding the weights. It times the
meta-update of each (median of --runs, rounds interleaved) and lists, from the structure of the
cluster graph, the tensors one meta-update sends between the chief and the workers (how many, how
many bytes, each way), next to the bytes the loopback interface actually carried. On two cores the towers share the same cores,
so this shows the overhead of the paths, not a speed-up; multiply the bytes by your network's
cost per byte to judge a real cluster.
"""
import argparse
import collections
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '1')   # as main.py for image data (grouped convolutions)
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'bench'))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import devices  # noqa: E402
from bench_conv_floor import CONFIGS, build_training_graph  # noqa: E402

tf1 = tf.compat.v1


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def start_workers(count):
    addresses = ['127.0.0.1:%d' % free_port() for _ in range(count)]
    processes = [subprocess.Popen([sys.executable, str(REPO / 'main.py'), '--job_name=worker', '--task_index=%d' % i,
                                   '--cluster=' + ','.join(addresses)], cwd=str(REPO),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(count)]
    if not devices.wait_for_workers(addresses, 60):
        raise SystemExit('workers did not start')
    return addresses, processes


def timed_session(config, placement, runs):
    graph, model = build_training_graph(config, towers=placement.towers, param_device=placement.param_device)
    sess = placement.session(graph)
    with graph.as_default():
        sess.run(tf1.global_variables_initializer())
    for _ in range(3):
        sess.run(model.metatrain_op)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(model.metatrain_op)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times)), sess, graph, model


def task_of(device):
    spec = tf1.DeviceSpec.from_string(device or '')
    return '/job:{}/task:{}'.format(spec.job or 'chief', spec.task or 0)


def wire_from_graph(graph, model):
    """{(from task, to task): [tensors, bytes]} that one meta-update needs sent between tasks, from the
    graph's structure: every edge of the ops the training op runs whose two ends sit on different
    tasks (unplaced ops go where their colocation group is, else to the chief; an op reading a
    variable runs where the variable is). Each tensor counts once per receiving task."""
    def device(op):
        if op.type in ('ReadVariableOp', 'ResourceGather') or not op.device:
            groups = [g.decode()[len('loc:@'):] for g in op.colocation_groups() if g.decode() != 'loc:@' + op.name]
            if op.type == 'ReadVariableOp':
                return device(op.inputs[0].op)
            if groups:
                return device(graph.get_operation_by_name(groups[0]))
        return op.device
    needed, stack = set(), [model.metatrain_op]
    while stack:
        op = stack.pop()
        if op.name in needed:
            continue
        needed.add(op.name)
        stack.extend(t.op for t in op.inputs)
        stack.extend(op.control_inputs)
    sent, traffic = set(), collections.defaultdict(lambda: [0, 0])
    for name in needed:
        op = graph.get_operation_by_name(name)
        to = task_of(device(op))
        for tensor in op.inputs:
            source = task_of(device(tensor.op))
            if source == to or (tensor.name, to) in sent or tensor.dtype == tf.resource:
                continue
            sent.add((tensor.name, to))
            entry = traffic[(source, to)]
            entry[0] += 1
            entry[1] += tensor.dtype.size * int(np.prod(tensor.shape.as_list())) if tensor.shape.is_fully_defined() else 0
    return traffic


def loopback_bytes():
    with open('/proc/net/dev') as f:
        for line in f:
            if line.strip().startswith('lo:'):
                return int(line.split(':', 1)[1].split()[0])
    return None


def measured_wire(sess, model, runs=5):
    """Bytes the loopback interface carried per meta-update (gRPC framing included), or None."""
    before = loopback_bytes()
    if before is None:
        return None
    for _ in range(runs):
        sess.run(model.metatrain_op)
    return (loopback_bytes() - before) / runs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('configs', nargs='*', default=['omniglot5'], choices=list(CONFIGS))
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--runs', type=int, default=10)
    args = parser.parse_args()
    tf1.disable_eager_execution()
    addresses, workers = start_workers(2)
    code = 0
    try:
        placements = {'one device': devices.single_device(),
                      '2 towers, logical CPUs': devices.local_placement('/cpu:0,/cpu:1'),
                      '2 loopback workers': devices.cluster_placement(','.join(addresses))}
        for name in args.configs:
            config = CONFIGS[name]
            ms = collections.defaultdict(list)
            for round_index in range(args.rounds):
                for path, placement in placements.items():
                    value, sess, graph, model = timed_session(config, placement, args.runs)
                    ms[path].append(value)
                    if round_index == 0 and 'workers' in path:
                        traffic, measured = wire_from_graph(graph, model), measured_wire(sess, model)
                    sess.close()
                    print('round {} {:<10s} {:<24s} {:8.1f} ms per meta-update'.format(
                        round_index + 1, name, path, value), flush=True)
            base = np.median(ms['one device'])
            print('\n{} (meta batch {}): median ms per meta-update'.format(name, config['meta_batch_size']))
            for path in placements:
                print('  {:<24s} {:8.1f} ms  ({:+.0f}% against one device)'.format(
                    path, np.median(ms[path]), 100 * (np.median(ms[path]) / base - 1)))
            print('  sent between tasks per meta-update (2 workers), from the graph:')
            for (source, target), (count, size) in sorted(traffic.items()):
                print('    {:<18s} -> {:<18s} {:4d} tensors, {:9.1f} KB'.format(source, target, count, size / 1024))
            total = sum(size for _, size in traffic.values())
            print('    in all: {:.2f} MB of tensors per meta-update'.format(total / 2 ** 20))
            if measured is not None:
                print('    measured on the loopback interface: {:.2f} MB per meta-update (gRPC framing '
                      'included)'.format(measured / 2 ** 20))
            sys.stdout.flush()
    except BaseException:   # noqa: BLE001  (reported, then the workers stop)
        traceback.print_exc()
        code = 1
    finally:
        for process in workers:
            process.send_signal(signal.SIGKILL)
            process.wait()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)   # the chief's gRPC server would keep the process alive


if __name__ == '__main__':
    main()
