"""Where the meta-batch runs: TensorFlow's default device, towers on this machine's devices, or
towers on the worker processes of a cluster (TensorFlow's distributed runtime over gRPC).

A tower takes an equal part of every meta-batch: the inner loops of its tasks and their share of
the meta-gradient. The weights, Adam and the input pipeline stay on one device (`param_device`),
which sums the towers' gradients before the single Adam step, so the update is the one-device
update up to float32 summation order.

Cluster: each worker runs `python main.py --job_name=worker --task_index=I --cluster=W0,W1,...`
and only serves its devices. The chief (the training command plus `--cluster=W0,W1,...`) starts
a server of its own, tells the workers the whole cluster through the session's `cluster_def`,
keeps the weights and writes the checkpoints on its own disk.
"""
import contextlib
import dataclasses
import os
import re
import socket
import time

import tensorflow as tf

from experiment import UserError

tf1 = tf.compat.v1
CHIEF_JOB = 'chief'
WORKER_JOB = 'worker'
CONNECT_TIMEOUT_S = 10.0
STEP_TIMEOUT_MS = 30 * 60 * 1000    # a cluster step that takes longer has lost a worker for good


@dataclasses.dataclass
class Placement:
    towers: list = None            # device per tower; None: TensorFlow's default placement
    param_device: str = None
    target: str = ''               # the session's master
    config: object = None          # tf1.ConfigProto for the session
    workers: list = dataclasses.field(default_factory=list)   # cluster worker addresses
    server: object = None          # the chief's own server (kept alive with the placement)

    def session(self, graph=None):
        return tf1.Session(self.target, graph=graph, config=self.config)


def single_device():
    return Placement()


def make_placement(f):
    """Where main.py's meta-batch runs, from its flags (f: --cluster, --devices, --cpu_towers, --train,
    --datasource, --meta_batch_size); UserError for devices or workers that are not there."""
    if f.cluster:
        placement = cluster_placement(f.cluster, f.chief_address or None)
    elif f.devices:
        placement = local_placement(f.devices)
    elif f.train and f.datasource != 'sinusoid' and not tf.config.list_physical_devices('GPU'):
        if f.cpu_towers and f.meta_batch_size % f.cpu_towers:
            raise UserError('--meta_batch_size={} does not split into --cpu_towers={} equal parts; use a divisor of '
                            'it, or 0 (one tower per core)'.format(f.meta_batch_size, f.cpu_towers))
        return core_towers(f.meta_batch_size, f.cpu_towers or None)
    else:
        return single_device()
    if f.train and f.meta_batch_size % len(placement.towers):
        raise UserError('--meta_batch_size={} does not split evenly over {} devices ({}); use a multiple of {}'.format(
            f.meta_batch_size, len(placement.towers), ', '.join(placement.towers), len(placement.towers)))
    return placement


def model_placement(placement):
    """The graph's default device: the data pipeline, weights and optimizer on param_device."""
    return tf.device(placement.param_device) if placement.param_device else contextlib.nullcontext()


## One tower per core
def usable_cores():
    """The cores this process may run on (its affinity; os.cpu_count() where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def core_towers(meta_batch_size, count=None):
    """The meta-batch split into `count` towers on the CPU (default: one per usable core, the most
    that divide the meta-batch), every operation on one thread and the towers side by side.

    A meta-update is a long chain of small operations (a few tasks' convolutions, batch norm,
    their derivatives): split over two threads each, they kept two cores about 60% busy; as two
    independent halves of the tasks, each on its own core, an iteration takes 7% (Omniglot 5-way)
    and 17% (20-way) less time (2-core Xeon, main.py against --cpu_towers=1, interleaved). The
    update is the one-tower update up to float32 summation order, as on any towers. One tower:
    TensorFlow's default placement and threads."""
    if count is None:
        cores = usable_cores()
        count = max(k for k in range(1, min(cores, meta_batch_size) + 1) if meta_batch_size % k == 0)
    if count <= 1:
        return single_device()
    own_intra_op_threads()
    config = tf1.ConfigProto(inter_op_parallelism_threads=count, intra_op_parallelism_threads=1)
    return Placement(towers=['/device:CPU:0'] * count, param_device='/device:CPU:0', config=config)


def own_intra_op_threads():
    """Make every session of this process run its operations on intra-op threads of its own, as many
    as its config says. TensorFlow otherwise shares one process-wide pool among all sessions, sized
    by whatever makes the first device: TF 2's eager context (one thread per core), which a
    tf.while_loop starts while the model's graph is built. The towers' intra_op_parallelism_threads=1
    then did not hold: each tower's convolutions were split over that shared pool, both towers' at
    once: a 20-way iteration of main.py took 666.7 ms against 625.0 on one thread per tower (5-way
    4-14% longer, MiniImagenet 1-shot 6%; bench/README.md). TensorFlow reads the setting once, at the
    process's first device: call this before building a graph. An explicit
    TF_OVERRIDE_GLOBAL_THREADPOOL in the environment wins."""
    os.environ.setdefault('TF_OVERRIDE_GLOBAL_THREADPOOL', '1')


## Towers on this machine
_DEVICE = re.compile(r'^/?(?:device:)?(cpu|gpu):(\d+)$', re.I)


def local_towers(spec, num_gpus):
    """--devices: '/gpu:0,/gpu:1' (or cpu), or a count N (the first N GPUs)."""
    spec = spec.strip()
    if spec.isdigit():
        count = int(spec)
        if count < 1:
            raise UserError('--devices={} must name at least one device'.format(spec))
        if count > num_gpus:
            raise UserError('--devices={} asks for {} GPUs but this machine has {}; name the devices '
                            'instead, e.g. --devices=/cpu:0,/cpu:1 to split the CPU'.format(spec, count, num_gpus))
        return ['/device:GPU:%d' % i for i in range(count)]
    towers = []
    for item in spec.split(','):
        match = _DEVICE.match(item.strip())
        if not match:
            raise UserError('--devices: {!r} is not a device; use /gpu:N or /cpu:N, comma-separated, or a '
                            'count'.format(item))
        kind, index = match.group(1).upper(), int(match.group(2))
        if kind == 'GPU' and index >= num_gpus:
            raise UserError('--devices: {} does not exist: this machine has {} GPU{}'.format(
                item.strip(), num_gpus, '' if num_gpus == 1 else 's'))
        towers.append('/device:%s:%d' % (kind, index))
    if len(set(towers)) != len(towers):
        raise UserError('--devices={} names a device twice'.format(spec))
    return towers


def local_placement(spec):
    """Towers on this machine's devices. CPU towers split the host into logical CPU devices
    (session device_count: TF1 sessions do not see tf.config's logical devices); that tests the
    tower path on any machine (core_towers is the split of one CPU that pays)."""
    towers = local_towers(spec, len(tf.config.list_physical_devices('GPU')))
    cpus = [int(t.rsplit(':', 1)[1]) for t in towers if 'CPU' in t]
    config = tf1.ConfigProto()
    if cpus:
        if max(cpus) >= (os.cpu_count() or 1):
            raise UserError('--devices: /cpu:{} does not exist: this machine has {} CPU core{} (one logical '
                            'CPU device per core at most)'.format(max(cpus), os.cpu_count(), 's' * (os.cpu_count() != 1)))
        config.device_count['CPU'] = max(cpus) + 1
    return Placement(towers=towers, param_device='/device:CPU:0', config=config)


## A cluster
def worker_addresses(cluster):
    addresses = [a.strip() for a in cluster.split(',') if a.strip()]
    for address in addresses:
        host, _, port = address.rpartition(':')
        if not host or not port.isdigit():
            raise UserError('--cluster: {!r} is not HOST:PORT'.format(address))
    if not addresses:
        raise UserError('--cluster is empty; give the workers as HOST:PORT,HOST:PORT')
    return addresses


def worker_command(addresses, index):
    return 'python main.py --job_name=worker --task_index={} --cluster={}'.format(index, ','.join(addresses))


def serve_worker(cluster, task_index):
    """Runs worker `task_index` of the cluster until the process is stopped."""
    addresses = worker_addresses(cluster)
    if not 0 <= task_index < len(addresses):
        raise UserError('--task_index={} but --cluster lists {} workers (0..{})'.format(
            task_index, len(addresses), len(addresses) - 1))
    spec = tf1.train.ClusterSpec({WORKER_JOB: {task_index: addresses[task_index]}})
    try:
        server = tf1.train.Server(spec, job_name=WORKER_JOB, task_index=task_index, start=True)
    except (tf.errors.OpError, RuntimeError) as error:
        raise UserError('worker {} cannot serve on {} ({}); is the port free?'.format(
            task_index, addresses[task_index], str(error).strip().splitlines()[0][:160]))
    print('Worker {} serving {} ({}); stop it with Ctrl-C.'.format(
        task_index, addresses[task_index], server.target), flush=True)
    server.join()


def unreachable(addresses, timeout=CONNECT_TIMEOUT_S):
    """[(task index, address, why)] of the workers that refuse or ignore a TCP connection."""
    down = []
    for index, address in enumerate(addresses):
        host, _, port = address.rpartition(':')
        try:
            socket.create_connection((host.strip('[]'), int(port)), timeout=timeout).close()
        except OSError as error:
            down.append((index, address, error.strerror or str(error) or type(error).__name__))
    return down


def _chief_address(addresses, chief_address):
    if chief_address:
        return chief_address
    host, _, port = addresses[0].rpartition(':')
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect((host, int(port)))           # no packet: picks the interface that reaches worker 0
        own_host = probe.getsockname()[0]
    finally:
        probe.close()
    with socket.socket() as free:
        free.bind((own_host, 0))
        return '{}:{}'.format(own_host, free.getsockname()[1])


def cluster_placement(cluster, chief_address=None):
    """Connects to the workers of --cluster: towers on each worker's first GPU (else its CPU),
    the weights on the chief's CPU."""
    addresses = worker_addresses(cluster)
    down = unreachable(addresses)
    if down:
        index, address, why = down[0]
        raise UserError('worker /job:{}/task:{} at {} is unreachable ({}); start it there with: {}'.format(
            WORKER_JOB, index, address, why, worker_command(addresses, index)))
    chief = _chief_address(addresses, chief_address)
    # The chief's server boots under a job of its own; the session's cluster_def names it 'chief'
    # and carries the whole cluster to the workers, so a worker needs to know only itself.
    server = tf1.train.Server(tf1.train.ClusterSpec({'local': [chief]}), job_name='local', task_index=0, start=True)
    _chief_servers.append(server)
    spec = tf1.train.ClusterSpec({CHIEF_JOB: [chief], WORKER_JOB: addresses})
    config = tf1.ConfigProto(cluster_def=spec.as_cluster_def(), operation_timeout_in_ms=STEP_TIMEOUT_MS)
    placement = Placement(param_device='/job:%s/task:0/device:CPU:0' % CHIEF_JOB, target=server.target,
                          config=config, workers=addresses, server=server)
    with placement.session(tf.Graph()) as sess:
        names = [d.name for d in sess.list_devices()]
    placement.towers = []
    for index in range(len(addresses)):
        task = '/job:%s/replica:0/task:%d/' % (WORKER_JOB, index)
        mine = [n for n in names if n.startswith(task)]
        gpus = [n for n in mine if '/device:GPU:' in n]
        placement.towers.append(gpus[0] if gpus else task + 'device:CPU:0')
    return placement


_chief_servers = []


def chief_server_running():
    return bool(_chief_servers)


def lost_worker_error(error, placement, itr, checkpoint):
    """The one-line UserError for a cluster step that failed: which worker is gone, what is kept.
    None if no worker can be blamed (the error is then not a lost worker's)."""
    down = []
    for _ in range(10):     # a killed worker's port can take a moment to close
        down = unreachable(placement.workers, timeout=2.0)
        if down:
            break
        time.sleep(0.5)
    text = str(error)
    named = re.findall(r'remote target /job:%s/replica:0/task:(\d+)' % WORKER_JOB, text)
    if down:
        index, address, why = down[0]
    elif named:
        index = int(named[0])
        grpc = re.findall(r'grpc_message:"([^"\\]*)', text)
        address, why = placement.workers[index], (grpc[0] if grpc else type(error).__name__)
    else:
        return None
    kept = 'the last checkpoint, {}, is intact'.format(checkpoint) if checkpoint else 'no checkpoint was saved yet'
    return UserError('worker /job:{}/task:{} at {} was lost at iteration {} ({}); {}: restart the worker ({}) and '
                     'rerun this command to resume'.format(WORKER_JOB, index, address, itr, why, kept,
                                                           worker_command(placement.workers, index)))


CLUSTER_ERRORS = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.DeadlineExceededError,
                  tf.errors.CancelledError, tf.errors.InternalError, tf.errors.UnknownError,
                  tf.errors.FailedPreconditionError, tf.errors.NotFoundError)


def wait_for_workers(addresses, seconds):
    """For tests and scripts: True once every worker accepts connections (within `seconds`)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if not unreachable(addresses, timeout=1.0):
            return True
        time.sleep(0.2)
    return False

