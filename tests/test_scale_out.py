"""The meta-batch over several devices (towers on logical CPUs) and machines (loopback workers):
the same meta-update as one device, training that resumes exactly, and the errors."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import types

import numpy as np
import pytest
import tensorflow as tf

import devices
from tests import golden
from tests.cli import run_main
from experiment import UserError
from tests.conftest import GOLDEN, REPO

tf1 = tf.compat.v1
CASES = ('omniglot_5w1s', 'sine_k10_2steps')
SINE = ['--datasource=sinusoid', '--norm=None', '--update_batch_size=5', '--meta_batch_size=4']
EXP = 'cls_5.mbs_4.ubs_5.numstep1.updatelr0.001nonorm'
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def start_worker(addresses, index):
    return subprocess.Popen([sys.executable, str(REPO / 'main.py'), '--job_name=worker', '--task_index=%d' % index,
                             '--cluster=' + ','.join(addresses)], cwd=str(REPO), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(process):
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.fixture
def workers():
    """Two workers on loopback; every one started here (restarts included) is stopped at the end."""
    addresses = ['127.0.0.1:%d' % free_port() for _ in range(2)]
    processes = [start_worker(addresses, i) for i in range(2)]

    def restart(index):
        stop(processes[index])
        processes.append(start_worker(addresses, index))
        processes[index] = processes[-1]
        assert devices.wait_for_workers(addresses, 60)
    try:
        assert devices.wait_for_workers(addresses, 60), 'workers did not start'
        yield addresses, processes, restart
    finally:
        for process in processes:
            stop(process)


def assert_same_meta_update(case, got, want):
    """Equal to float32 rounding: relative to each quantity's size, except the gradients whose true
    value is zero (biases that feed batch norm: rounding noise), held to a hundredth of the golden
    tolerance, and their Adam steps, which golden leaves out too.

    The weights after three Adam steps are held to their golden tolerance (ten times what the
    reference's own float32 rounding, oneDNN on against off, moved them): Adam divides each gradient
    by its running size, so where a component nearly cancels from one meta-step to the next a
    rounding difference grows a thousandfold. With the first layer's batch norm from the patches,
    the meta-gradients of omniglot_5w1s agree to 2e-6 of their scale across placements, and one
    offset of the first layer after three steps to 1.3e-4 (0.42 of its tolerance)."""
    with open(GOLDEN / 'cases' / case / 'tolerances.json') as f:
        tolerances = json.load(f)
    assert set(got) == set(want)
    for name, tolerance in tolerances.items():
        diff = float(np.max(np.abs(np.asarray(got[name]) - np.asarray(want[name]))))
        scale = float(np.max(np.abs(want[name])))
        adam_steps = name.startswith('after_')
        assert (diff <= 1e-4 * scale or diff <= 0.01 * tolerance
                or (adam_steps and diff <= tolerance)), (case, name, diff, scale, tolerance)
    meta_gradients = [n for n in tolerances if n.startswith('grad/')]
    assert len(meta_gradients) >= 6
    assert any(n.startswith('after_metatrain/') for n in tolerances)


@pytest.fixture(scope='module')
def single_device(golden_results):
    return {case: golden_results(case) for case in CASES}


@pytest.mark.slow
@pytest.mark.parametrize('case', CASES)
def test_two_towers_on_logical_cpus_give_the_one_device_meta_update(case, single_device):
    placement = devices.local_placement('/cpu:0,/cpu:1')
    assert placement.towers == ['/device:CPU:0', '/device:CPU:1']
    got = golden.compute_case(str(GOLDEN / 'cases' / case), placement)
    assert_same_meta_update(case, got, single_device[case])
    assert golden.compare(str(GOLDEN / 'cases' / case), got)[0][1] <= 1.0


@pytest.mark.parametrize('case', [pytest.param(c, marks=[pytest.mark.slow] if c.startswith('omniglot') else [])
                                  for c in CASES])
def test_one_tower_per_core_gives_the_one_device_meta_update(case, single_device):
    placement = devices.core_towers(4, count=2)    # the cases' meta-batches hold 4 tasks
    assert placement.towers == ['/device:CPU:0'] * 2
    assert (placement.config.inter_op_parallelism_threads, placement.config.intra_op_parallelism_threads) == (2, 1)
    got = golden.compute_case(str(GOLDEN / 'cases' / case), placement)
    assert_same_meta_update(case, got, single_device[case])
    assert golden.compare(str(GOLDEN / 'cases' / case), got)[0][1] <= 1.0


CORES_USED_BY_ONE_TOWER = """
import sys, time
sys.path.insert(0, sys.argv[1])
import devices
import tensorflow as tf
tf1 = tf.compat.v1
tf1.disable_eager_execution()
placement = devices.core_towers(2, count=2)
tf.config.list_logical_devices('CPU')    # TF 2's context makes the first devices, as the model's tf.while_loop does
graph = tf.Graph()
with graph.as_default(), tf.device(placement.towers[0]):
    matrix = tf1.Variable(tf1.random_normal([1536, 1536]))
    product = tf.reduce_sum(tf.matmul(matrix, matrix))    # one large operation: any pool would split it
with placement.session(graph=graph) as sess:
    sess.run(tf1.global_variables_initializer())
    sess.run(product)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(15):
        sess.run(product)
    print((time.process_time() - cpu) / (time.perf_counter() - wall))
"""


@pytest.mark.skipif(devices.usable_cores() < 2, reason='needs two cores to tell one thread from two')
def test_a_tower_runs_each_operation_on_one_thread():
    # Without a pool of its own, the towers' session used TensorFlow's shared intra-op pool (one
    # thread per core): one tower's matrix product kept both cores busy (1.9 cores per second).
    env = {k: v for k, v in ENV.items() if k != 'TF_OVERRIDE_GLOBAL_THREADPOOL'}
    out = subprocess.run([sys.executable, '-c', CORES_USED_BY_ONE_TOWER, str(REPO)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    cores_busy = float(out.stdout.split()[-1])
    assert cores_busy < 1.3


@pytest.mark.parametrize('cores, meta_batch_size, towers', [(2, 32, 2), (2, 16, 2), (3, 32, 2), (8, 12, 6), (2, 5, 1),
                                                            (4, 1, 1), (1, 32, 1)])
def test_one_tower_per_core_that_divides_the_meta_batch(monkeypatch, cores, meta_batch_size, towers):
    monkeypatch.setattr(devices, 'usable_cores', lambda: cores)
    placement = devices.core_towers(meta_batch_size)
    assert len(placement.towers or [None]) == towers
    assert (placement.config is None) == (towers == 1)    # one tower: TensorFlow's default threads


def test_main_trains_image_data_on_one_tower_per_core(monkeypatch):
    monkeypatch.setattr(devices, 'usable_cores', lambda: 2)
    f = types.SimpleNamespace(datasource='omniglot', train=True, meta_batch_size=32, cpu_towers=0, devices='', cluster='')
    assert devices.make_placement(f).towers == ['/device:CPU:0'] * 2
    f.cpu_towers = 1
    assert devices.make_placement(f).towers is None
    f.cpu_towers, f.datasource = 0, 'sinusoid'      # overhead-bound: towers would only add operations
    assert devices.make_placement(f).towers is None
    f.datasource, f.train, f.meta_batch_size = 'omniglot', False, 1     # evaluation: one task at a time
    assert devices.make_placement(f).towers is None


@pytest.mark.slow
def test_two_loopback_workers_give_the_one_device_meta_update(workers, single_device, tmp_path):
    addresses, _, _ = workers
    for case in CASES:
        out = tmp_path / (case + '.npz')
        result = subprocess.run([sys.executable, '-m', 'tests.golden', '--cluster=' + ','.join(addresses),
                                 '--save=' + str(out), str(GOLDEN / 'cases' / case)],
                                cwd=str(REPO), env=ENV, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert_same_meta_update(case, dict(np.load(out)), single_device[case])


def test_the_graph_places_each_towers_tasks_on_its_device():
    from maml import MAML, ModelConfig
    with tf.Graph().as_default():
        with tf.device('/device:CPU:0'):
            model = MAML(ModelConfig(datasource='sinusoid', norm='None', meta_batch_size=4), towers=[
                '/job:worker/task:0', '/job:worker/task:1'], param_device='/device:CPU:0')
            model.construct_model(prefix='metatrain_')
        ops = tf1.get_default_graph().get_operations()
        on = lambda task: [op for op in ops if op.device.startswith('/job:worker/task:%d' % task)]
        assert on(0) and on(1)
        batch = {op.inputs[0].shape[0] for op in on(1) if op.type == 'BatchMatMulV2'}    # its 2 of the 4 tasks
        assert batch - {None} == {2}
        gradients = [op for op in ops if op.name.startswith('gradients_1/') and op.type in ('BatchMatMulV2', 'MatMul')]
        assert gradients and all(op.device.startswith('/job:worker/') for op in gradients)   # colocated
        assert all(v.device == '/device:CPU:0' for v in tf1.global_variables())


# ------------------------------------------------------------------------------ main.py on towers and a cluster
@pytest.mark.slow
def test_training_on_towers_prints_and_saves_what_one_device_does(tmp_path, read_checkpoint):
    runs = {}
    for name, extra in (('one', []), ('towers', ['--devices=/cpu:0,/cpu:1'])):
        result = run_main(*SINE, '--metatrain_iterations=1001', '--logdir=' + str(tmp_path / name), *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = result
    line = lambda r: [l for l in r.stdout.splitlines() if l.startswith('Iteration 1000:')][0]
    one, towers = (np.array(line(runs[n]).split(':')[1].split(','), float) for n in ('one', 'towers'))
    np.testing.assert_allclose(towers, one, rtol=1e-3)
    want, got = (read_checkpoint(tmp_path / n / EXP / 'model1000') for n in ('one', 'towers'))
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-3, atol=1e-5, err_msg=name)
    evaluated = run_main(*SINE, '--train=False', '--devices=/cpu:0,/cpu:1', '--logdir=' + str(tmp_path / 'towers'))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]       # meta batch 1: the first tower
    assert (tmp_path / 'towers' / EXP / 'test_ubs5_stepsize0.001.csv').is_file()


@pytest.mark.slow
def test_training_through_the_cluster_resumes_exactly_and_a_lost_worker_is_named(workers, tmp_path, read_checkpoint,
                                                                                 one_line_error):
    addresses, processes, restart = workers
    cluster = '--cluster=' + ','.join(addresses)
    full = tmp_path / 'full'
    result = run_main(*SINE, '--metatrain_iterations=1100', '--logdir=' + str(full), cluster)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (full / EXP).glob('model*.index')) == ['model1000.index', 'model1099.index']

    # Worker 1 dies: the chief names it; the last checkpoint stays; after a restart the run resumes
    # and ends with the weights of the uninterrupted run.
    resumed = tmp_path / 'resumed'
    shutil.copytree(full, resumed)
    for f in (resumed / EXP).glob('model1099.*'):
        f.unlink()
    stop(processes[1])
    lost = run_main(*SINE, '--metatrain_iterations=1100', '--logdir=' + str(resumed), cluster)
    one_line_error(lost, 'worker /job:worker/task:1 at ' + addresses[1], 'unreachable',
                          '--job_name=worker --task_index=1 --cluster=' + ','.join(addresses))
    restart(1)
    again = run_main(*SINE, '--metatrain_iterations=1100', '--logdir=' + str(resumed), cluster)
    assert again.returncode == 0, again.stderr[-3000:]
    assert 'Restoring model weights from {}'.format(resumed / EXP / 'model1000') in again.stdout
    want, got = read_checkpoint(full / EXP / 'model1099'), read_checkpoint(resumed / EXP / 'model1099')
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-6, err_msg=name)


@pytest.mark.slow
def test_a_worker_killed_mid_run_stops_the_chief_with_one_line_and_keeps_the_checkpoint(workers, tmp_path,
                                                                                       one_line_error):
    addresses, processes, _ = workers
    chief = subprocess.Popen([sys.executable, '-u', str(REPO / 'main.py'), *SINE, '--metatrain_iterations=100000',
                              '--logdir=' + str(tmp_path), '--cluster=' + ','.join(addresses)],
                             cwd=str(REPO), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in chief.stdout:
        if line.startswith('Iteration 1000:'):    # model1000 is saved right after this line
            break
    stdout = []
    for line in chief.stdout:                     # the next progress line comes after the save
        stdout.append(line)
        if line.startswith('    '):
            break
    stop(processes[0])
    rest, stderr = chief.communicate(timeout=300)
    result = subprocess.CompletedProcess(chief.args, chief.returncode, ''.join(stdout) + rest, stderr)
    line = one_line_error(result, 'worker /job:worker/task:0 at ' + addresses[0], 'was lost at iteration',
                                 'the last checkpoint, {}, is intact'.format(tmp_path / EXP / 'model1000'))
    assert 'rerun this command to resume' in line
    assert golden_free_check(tmp_path / EXP / 'model1000')


def golden_free_check(path):
    from experiment import checkpoint_problem
    return checkpoint_problem(str(path)) is None


def test_an_unreachable_worker_is_named_at_start(tmp_path, run_in_process):
    addresses = ['127.0.0.1:%d' % free_port() for _ in range(2)]
    with pytest.raises(UserError) as raised:
        run_in_process(*SINE, '--metatrain_iterations=10', '--logdir=' + str(tmp_path), '--cluster=' + ','.join(addresses))
    message = str(raised.value)
    for needle in ('worker /job:worker/task:0 at ' + addresses[0], 'unreachable',
                   'python main.py --job_name=worker --task_index=0 --cluster=' + ','.join(addresses)):
        assert needle in message, message
    assert not list(tmp_path.iterdir())
