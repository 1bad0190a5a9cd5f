"""
Usage Instructions:
    10-shot sinusoid:
        python main.py --datasource=sinusoid --logdir=logs/sine/ --metatrain_iterations=70000 --norm=None --update_batch_size=10

    10-shot sinusoid baselines:
        python main.py --datasource=sinusoid --logdir=logs/sine/ --pretrain_iterations=70000 --metatrain_iterations=0 --norm=None --update_batch_size=10 --baseline=oracle
        python main.py --datasource=sinusoid --logdir=logs/sine/ --pretrain_iterations=70000 --metatrain_iterations=0 --norm=None --update_batch_size=10

    5-way, 1-shot omniglot:
        python main.py --datasource=omniglot --metatrain_iterations=60000 --meta_batch_size=32 --update_batch_size=1 --update_lr=0.4 --num_updates=1 --logdir=logs/omniglot5way/

    20-way, 1-shot omniglot:
        python main.py --datasource=omniglot --metatrain_iterations=60000 --meta_batch_size=16 --update_batch_size=1 --num_classes=20 --update_lr=0.1 --num_updates=5 --logdir=logs/omniglot20way/

    5-way 1-shot mini imagenet:
        python main.py --datasource=miniimagenet --metatrain_iterations=60000 --meta_batch_size=4 --update_batch_size=1 --update_lr=0.01 --num_updates=5 --num_classes=5 --logdir=logs/miniimagenet1shot/ --num_filters=32 --max_pool=True

    5-way 5-shot mini imagenet:
        python main.py --datasource=miniimagenet --metatrain_iterations=60000 --meta_batch_size=4 --update_batch_size=5 --update_lr=0.01 --num_updates=5 --num_classes=5 --logdir=logs/miniimagenet5shot/ --num_filters=32 --max_pool=True

    To run evaluation, use the '--train=False' flag and the '--test_set=True' flag to use the test set.

    The meta-batch is computed by fast_paths.py (--fast_paths=auto, the default) where it pays, for the
    paper's networks; --fast_paths=off runs maml.py's plain definition (tf.map_fn over tasks, autodiff).

    For omniglot and miniimagenet training, acquire the dataset online, put it in the correspoding data
    directory, and see the python scripts data/prepare_omniglot.py and data/prepare_miniimagenet.py.
"""
import concurrent.futures
import csv
import os
import pickle
import platform
import random
import signal
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


def _runs_convolutions(argv):
    """Whether the command line asks for an image data source (the flags are parsed later)."""
    for i, arg in enumerate(argv):
        if arg.startswith('--datasource='):
            return arg.split('=', 1)[1] != 'sinusoid'
        if arg == '--datasource' and i + 1 < len(argv):
            return argv[i + 1] != 'sinusoid'
    return False


def onednn_default(argv, machine, as_script):
    """What main.py sets TF_ENABLE_ONEDNN_OPTS to where the user has not: '1', '0' or None (no change).

    TensorFlow turns oneDNN on by itself only on x86 CPUs with AVX-512 VNNI or newer. On others
    (AVX2) the conv nets need it too: grouped convolution, 3x faster graph building, less memory,
    and 15-20% faster meta-updates (measured on a 2-core AVX2 AMD EPYC); so do cluster workers,
    which may be sent a conv net. The sinusoid's small dense net runs faster without it, on those
    newer CPUs too (1.2 against 1.7 ms per meta-iteration on an AVX-512 Xeon); that is set only in
    main.py's own process, not where a test imports it (its children would inherit it)."""
    if machine.lower() not in ('x86_64', 'amd64'):
        return None
    if _runs_convolutions(argv) or any(a.startswith('--job_name') for a in argv):
        return '1'
    return '0' if as_script else None


_ONEDNN = onednn_default(sys.argv[1:], platform.machine(), __name__ == '__main__')
if _ONEDNN is not None:
    os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', _ONEDNN)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402
from tensorflow.core.protobuf import config_pb2  # noqa: E402

import data_generator as data  # noqa: E402
import devices  # noqa: E402
import experiment  # noqa: E402
from experiment import Progress, UserError, checkpoint_iteration  # noqa: E402
from maml import FAST_PATHS, MAML, ModelConfig  # noqa: E402
from utils import NORMS  # noqa: E402

tf1 = tf.compat.v1
FLAGS = flags.FLAGS

## Dataset/method options
flags.DEFINE_string('datasource', 'sinusoid', 'sinusoid or omniglot or miniimagenet')
flags.DEFINE_integer('num_classes', 5, 'number of classes used in classification (e.g. 5-way classification).')
# oracle means task id is input (only suitable for sinusoid)
flags.DEFINE_string('baseline', None, 'oracle, or None')

## Training options
flags.DEFINE_integer('pretrain_iterations', 0, 'number of pre-training iterations.')
flags.DEFINE_integer('metatrain_iterations', 15000, 'number of metatraining iterations.')  # 15k for omniglot, 50k for sinusoid
flags.DEFINE_integer('meta_batch_size', 25, 'number of tasks sampled per meta-update')
flags.DEFINE_float('meta_lr', 0.001, 'the base learning rate of the generator')
flags.DEFINE_integer('update_batch_size', 5, 'number of examples used for inner gradient update (K for K-shot learning).')
flags.DEFINE_float('update_lr', 1e-3, 'step size alpha for inner gradient update.')  # 0.1 for omniglot
flags.DEFINE_integer('num_updates', 1, 'number of inner gradient updates during training.')

## Model options
flags.DEFINE_string('norm', 'batch_norm', 'batch_norm, layer_norm, or None')
flags.DEFINE_integer('num_filters', 64, 'number of filters for conv nets -- 32 for miniimagenet, 64 for omiglot.')
flags.DEFINE_bool('conv', True, 'whether or not to use a convolutional network, only applicable in some cases')
flags.DEFINE_bool('max_pool', False, 'Whether or not to use max pooling rather than strided convolutions')
flags.DEFINE_bool('stop_grad', False, 'if True, do not use second derivatives in meta-optimization (for speed)')

## Logging, saving, and testing options
flags.DEFINE_bool('log', True, 'if false, do not log summaries, for debugging code.')
flags.DEFINE_string('logdir', '/tmp/data', 'directory for summaries and checkpoints.')
flags.DEFINE_bool('resume', True, 'resume training if there is a model available')
flags.DEFINE_bool('train', True, 'True to train, False to test.')
flags.DEFINE_integer('test_iter', -1, 'iteration to load model (-1 for latest model)')
flags.DEFINE_bool('test_set', False, 'Set to true to test on the the test set, False for the validation set.')
flags.DEFINE_integer('train_update_batch_size', -1, 'number of examples used for gradient update during training (use if you want to test with a different number).')
flags.DEFINE_float('train_update_lr', -1, 'value of inner gradient step step during training. (use if you want to test with a different value)')  # 0.1 for omniglot

## Added by this port
flags.DEFINE_string('devices', '', 'split each meta-batch over these devices: /gpu:0,/gpu:1 (or /cpu:0,/cpu:1), or a count of GPUs')
flags.DEFINE_integer('cpu_towers', 0, 'on a machine without GPUs, split each training meta-batch of images into this many '
                     'towers, each operation on one thread (0: one per core, the most that divide --meta_batch_size; '
                     '1: one, with TensorFlow\'s default threads)')
flags.DEFINE_string('cluster', '', 'HOST:PORT,HOST:PORT of the worker processes to split each meta-batch over')
flags.DEFINE_string('job_name', '', 'worker: serve this machine\'s devices to a chief (with --cluster, --task_index)')
flags.DEFINE_integer('task_index', 0, 'which worker of --cluster this process is')
flags.DEFINE_string('chief_address', '', 'HOST:PORT the workers reach the chief at (default: a free port on the '
                    'interface that reaches the first worker)')
flags.DEFINE_bool('moments_stop_gradient', False, 'batch/layer norm moments as tf.nn.moments builds them since TF 1.3 '
                  '(the mean inside the variance a constant to differentiation): a second derivative through them '
                  'lacks a term, as the reference computes on TF >= 1.3 and the golden cases pin. Default: as TF 1.1/1.2, '
                  'the reference\'s first versions (exact derivatives of every order)')
flags.DEFINE_integer('keep_checkpoint_every', 0, 'also keep every checkpoint whose iteration is a multiple of this '
                     '(0: only the newest 10, as the reference); e.g. to evaluate the run at earlier points')
flags.DEFINE_string('data_root', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data'),
                    'folder holding omniglot_resized/ and miniImagenet/')
flags.DEFINE_string('fast_paths', 'auto', 'auto: compute the meta-batch with fast_paths.py where it was measured to '
                    'pay, for the paper\'s networks only (it says so when it steps aside); off: maml.py\'s plain '
                    'definition (tf.map_fn over tasks, autodiff), as the reference')

SUMMARY_INTERVAL = 100
SAVE_INTERVAL = 1000
NUM_TEST_POINTS = 600
TRAIN_SEED = 5
VAL_SEED, TEST_SEED = 1000, 2000
MINIIMAGENET_TRAIN_QUERY = 15   # query images per class while training (K at test time)


def check_flags(f):
    """Raises UserError naming the first impossible flag value or combination."""
    if f.datasource not in ('sinusoid', 'omniglot', 'miniimagenet'):
        raise UserError('--datasource={!r} is not known; use sinusoid, omniglot or miniimagenet'.format(f.datasource))
    if f.norm not in NORMS:
        raise UserError('--norm={!r} is not known; use batch_norm, layer_norm or None'.format(f.norm))
    if f.baseline not in (None, 'oracle'):
        raise UserError('--baseline={!r} is not known; use oracle or leave it unset'.format(f.baseline))
    if f.baseline == 'oracle' and f.datasource != 'sinusoid':
        raise UserError('--baseline=oracle feeds the sinusoid amplitude and phase; it only works with --datasource=sinusoid')
    for name in ('num_classes', 'meta_batch_size', 'update_batch_size', 'num_updates', 'num_filters'):
        if getattr(f, name) <= 0:
            raise UserError('--{}={} must be a positive integer'.format(name, getattr(f, name)))
    for name in ('meta_lr', 'update_lr'):
        if not getattr(f, name) > 0:
            raise UserError('--{}={} must be a positive step size'.format(name, getattr(f, name)))
    for name in ('pretrain_iterations', 'metatrain_iterations'):
        if getattr(f, name) < 0:
            raise UserError('--{}={} must be zero or more'.format(name, getattr(f, name)))
    if f.keep_checkpoint_every < 0:
        raise UserError('--keep_checkpoint_every={} must be zero (keep only the newest 10) or a positive '
                        'interval'.format(f.keep_checkpoint_every))
    if f.train_update_batch_size != -1 and f.train_update_batch_size <= 0:
        raise UserError('--train_update_batch_size must be positive (or -1: same as --update_batch_size)')
    if f.train_update_lr != -1 and not f.train_update_lr > 0:
        raise UserError('--train_update_lr must be positive (or -1: same as --update_lr)')
    if f.datasource == 'miniimagenet' and f.conv and not f.max_pool:
        raise UserError('--datasource=miniimagenet needs --max_pool=True: its head expects the 5x5 map '
                        'that four 2x2 max pools leave of 84x84 images')
    if f.cpu_towers < 0:
        raise UserError('--cpu_towers={} must be 0 (one per core) or a number of towers'.format(f.cpu_towers))
    if f.devices and f.cluster:
        raise UserError('--devices and --cluster both split the meta-batch; use one of them')
    if f.train and f.pretrain_iterations + f.metatrain_iterations == 0:
        raise UserError('nothing to train: --pretrain_iterations and --metatrain_iterations are both 0')
    if f.fast_paths not in FAST_PATHS:
        raise UserError('--fast_paths={!r} is not known; use auto or off'.format(f.fast_paths))
    if f.job_name and (f.job_name != 'worker' or not f.cluster):
        raise UserError('--job_name={!r}: the only job is worker, with --cluster and --task_index'.format(f.job_name))


def test_num_updates_for(datasource, train):
    if datasource == 'sinusoid':
        return 5 if train else 10
    if datasource == 'miniimagenet':
        return 1 if train else 10   # evaluate at least one update during training
    return 10


def experiment_dir(f):
    name = experiment.experiment_name(f.num_classes, f.meta_batch_size,
                           f.update_batch_size if f.train_update_batch_size == -1 else f.train_update_batch_size,
                           f.num_updates, f.update_lr if f.train_update_lr == -1 else f.train_update_lr,
                           f.num_filters, f.max_pool, f.stop_grad, f.baseline, f.norm)
    return os.path.join(f.logdir, name)


## Data
def image_tasks(f, split, batch_size, rounds, seed):
    """ImageTasks for one split of Omniglot or MiniImagenet."""
    if f.datasource == 'omniglot':
        folders = data.omniglot_split(
            data.omniglot_character_folders(os.path.join(f.data_root, 'omniglot_resized')), split)
        dataset = data.load_image_dataset('omniglot', folders, 28, 1, os.path.join(f.data_root, '.cache'))
        return data.ImageTasks(dataset, f.num_classes, f.update_batch_size, rounds, batch_size,
                               rotate=True, invert=True, seed=seed)
    folders = data.miniimagenet_class_folders(os.path.join(f.data_root, 'miniImagenet'), split)
    dataset = data.load_image_dataset('miniimagenet', folders, 84, 3, os.path.join(f.data_root, '.cache'))
    return data.ImageTasks(dataset, f.num_classes, f.update_batch_size, rounds, batch_size,
                           rotate=False, invert=False, seed=seed)


FEED_ORDER = ('inputa', 'inputb', 'labela', 'labelb')


def sinusoid_feed(f, generator, rng):
    """One meta-batch of sinusoid tasks, as values for the model's placeholders in FEED_ORDER."""
    inputs, outputs, amp, phase = generator.generate(rng)
    if f.baseline == 'oracle':
        inputs = data.with_oracle_inputs(inputs, amp, phase)
    batch = data.split_support_query(inputs, outputs, f.update_batch_size)
    return [batch[name].astype(np.float32) for name in FEED_ORDER]


## Training
class StopRequest:
    """Turns Ctrl-C / SIGTERM into a request to stop after the current iteration (and save)."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print('Stopping after this iteration and saving a checkpoint (press again to abort)...', flush=True)


def print_intervals(datasource):
    """(progress line, validation line) intervals in iterations."""
    print_interval = 1000 if datasource == 'sinusoid' else 100
    return print_interval, print_interval * 5


def reports(itr, print_interval):
    """Whether iteration itr computes the summaries and printed losses (and, with summaries on,
    draws one validation batch for the validation summaries)."""
    return itr % SUMMARY_INTERVAL == 0 or itr % print_interval == 0


def validates(itr, test_print_interval):
    return itr != 0 and itr % test_print_interval == 0


def validation_batches_before(itr, datasource, summaries):
    """How many validation batches training draws before iteration itr: a resumed run starts its
    validation stream there, so it prints the numbers of the same tasks as an uninterrupted run."""
    print_interval, test_print_interval = print_intervals(datasource)
    return sum((summaries and reports(i, print_interval)) + validates(i, test_print_interval)
               for i in range(itr))


def train(model, sess, saver, f, exp_dir, resume_itr, next_feed, feed_list, val_enabled, placement, checkpoint):
    print_interval, test_print_interval = print_intervals(f.datasource)
    total = f.pretrain_iterations + f.metatrain_iterations
    writer = SummaryWriter(exp_dir, sess.graph) if f.log else None
    steps = TrainingSteps(model, sess, feed_list)
    print('Done initializing, starting training.')
    prelosses, postlosses = [], []
    progress = Progress(resume_itr, total)
    stop = StopRequest()
    itr = resume_itr
    try:
        for itr in range(resume_itr, total):
            pretraining = itr < f.pretrain_iterations
            if reports(itr, print_interval):
                summary, pre, post = steps.reporting(pretraining)(*next_feed(itr))
                prelosses.append(pre)
                postlosses.append(post)
                if writer:
                    writer.get().add_summary(summary, itr)
                    if val_enabled:
                        writer.get().add_summary(sess.run(model.metaval_summ_op), itr)
            else:
                steps.plain(pretraining)(*next_feed(itr))

            if itr != 0 and itr % print_interval == 0:
                label = 'Pretrain Iteration ' + str(itr) if pretraining else 'Iteration ' + str(itr - f.pretrain_iterations)
                print('{}: {}, {}'.format(label, np.mean(prelosses), np.mean(postlosses)))
                print('    ' + progress.line(itr), flush=True)
                prelosses, postlosses = [], []

            if (itr != 0 and itr % SAVE_INTERVAL == 0) or itr == total - 1 or stop.requested:
                checkpoint = experiment.save_checkpoint(saver, sess, exp_dir, itr, keep_every=f.keep_checkpoint_every)

            if val_enabled and validates(itr, test_print_interval):
                val = sess.run([model.metaval_total_accuracy1, model.metaval_total_accuracies2[f.num_updates - 1]])
                print('Validation results: ' + str(val[0]) + ', ' + str(val[1]), flush=True)

            if stop.requested:
                print('Stopped after iteration {}; rerun the same command to resume.'.format(itr))
                break
    except devices.CLUSTER_ERRORS as error:
        lost = placement.workers and devices.lost_worker_error(error, placement, itr, checkpoint)
        if lost:
            raise lost from error
        raise
    finally:
        if writer:
            writer.close()


class SummaryWriter:
    """tf1.summary.FileWriter(exp_dir, graph), opened on a thread: it writes the graph for TensorBoard
    as the reference's does, and serialising it takes about half a second for Omniglot 20-way, which
    the first iteration (TensorFlow's C++, the GIL released) hides. get() waits for it, and raises
    what opening it raised."""

    def __init__(self, exp_dir, graph):
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self._opening = pool.submit(self._open, exp_dir, graph)
        pool.shutdown(wait=False)   # the thread ends once the writer is open

    @staticmethod
    def _open(exp_dir, graph):
        # The default graph is per thread: the meta graph's collections are read from it.
        with graph.as_default():
            return tf1.summary.FileWriter(exp_dir, graph)

    def get(self):
        return self._opening.result()

    def close(self):
        """Closes the writer once it is open. A failure to open it is get()'s to raise; here (in a
        `finally`, perhaps with another error on its way) it is only reported."""
        error = self._opening.exception()
        if error is None:
            self._opening.result().close()
        else:
            print('warning: no TensorBoard events written: {}'.format(error), file=sys.stderr)


class TrainingSteps:
    """One training iteration as a session callable: `plain` runs the update alone, `reporting` also
    returns the summary and the pre- and post-update numbers that are printed."""

    def __init__(self, model, sess, feed_list):
        self.model, self.sess, self.feed_list = model, sess, feed_list
        self._callables = {}

    def _callable(self, pretraining, reporting):
        key = (pretraining, reporting)
        if key not in self._callables:
            model, last = self.model, self.model.config.num_updates - 1
            fetches = []
            if reporting:
                pre, post = ((model.total_accuracy1, model.total_accuracies2[last]) if model.classification
                             else (model.total_loss1, model.total_losses2[last]))
                fetches = [model.metatrain_summ_op, pre, post]
            target = model.pretrain_op if pretraining else model.metatrain_op
            self._callables[key] = session_callable(self.sess, fetches, self.feed_list, [target])
        return self._callables[key]

    def plain(self, pretraining):
        return self._callable(pretraining, False)

    def reporting(self, pretraining):
        return self._callable(pretraining, True)


def session_callable(sess, fetches, feeds, targets=()):
    """f(*feed values) -> the values of `fetches` (tensors), also running `targets` (ops).

    TensorFlow's callable API: unlike Session.run (and make_callable with feeds, which falls back
    to it), it does not rebuild the feed and fetch bookkeeping in Python on every call: about 1 ms
    less per sinusoid iteration, a quarter of it. Feed values must have the placeholders' dtypes.
    """
    options = config_pb2.CallableOptions()
    options.feed.extend(t.name for t in feeds)
    options.fetch.extend(t.name for t in fetches)
    options.target.extend(op.name for op in targets)
    return sess._make_callable_from_options(options)   # noqa: SLF001  (the public make_callable falls back)


## Evaluation
def test(model, sess, f, exp_dir, next_feed, feed_list):
    """600 tasks, meta batch 1: pre-update and after every step, mean, std and 95% CI."""
    np.random.seed(1)
    random.seed(1)
    if model.classification:
        evaluate = session_callable(sess, [model.metaval_total_accuracy1] + model.metaval_total_accuracies2, [])
    else:
        evaluate = session_callable(sess, [model.total_loss1] + model.total_losses2, feed_list)
    values = np.array([evaluate(*next_feed(None)) for _ in range(NUM_TEST_POINTS)])
    means = np.mean(values, 0)
    stds = np.std(values, 0)
    ci95 = (1.96 * stds / np.sqrt(NUM_TEST_POINTS)).astype(values.dtype)
    print('Mean validation accuracy/loss, stddev, and confidence intervals')
    print((means, stds, ci95))
    stem = os.path.join(exp_dir, 'test_ubs' + str(f.update_batch_size) + '_stepsize' + str(f.update_lr))
    with open(stem + '.pkl', 'wb') as out:
        pickle.dump({'mses': values}, out)
    with open(stem + '.csv', 'w', newline='') as out:
        writer = csv.writer(out, delimiter=',')
        writer.writerow(['update' + str(i) for i in range(len(means))])
        writer.writerow(means)
        writer.writerow(stds)
        writer.writerow(ci95)
    print('Wrote ' + stem + '.csv')
    return means, stds, ci95


def build_image_model(f, config, test_num_updates, resume_itr, total, placement):
    """The model over tf.data task streams; returns it and the (op, feed) pairs that load the images."""
    initializers = []
    if f.train:
        query = MINIIMAGENET_TRAIN_QUERY if f.datasource == 'miniimagenet' else f.update_batch_size
        rounds = f.update_batch_size + query
        train_tasks = image_tasks(f, 'train', config.meta_batch_size, rounds, TRAIN_SEED)
        eval_tasks = image_tasks(f, 'val', config.meta_batch_size, rounds, VAL_SEED)
        model = MAML(config, train_tasks.dim_input, f.num_classes, test_num_updates,
                     towers=placement.towers, param_device=placement.param_device)
        tensors, init = train_tasks.make_input_tensors(resume_itr, total - resume_itr, 'train')
        model.construct_model(tensors, prefix='metatrain_')
        initializers.append(init)
        num_eval_batches = 10 ** 9
    else:
        eval_tasks = image_tasks(f, 'test' if f.test_set else 'val', 1, 2 * f.update_batch_size, TEST_SEED)
        model = MAML(config, eval_tasks.dim_input, f.num_classes, test_num_updates,
                     towers=placement.towers, param_device=placement.param_device)
        num_eval_batches = NUM_TEST_POINTS
    first_eval_batch = validation_batches_before(resume_itr, f.datasource, f.log) if f.train else 0
    tensors, init = eval_tasks.make_input_tensors(first_eval_batch, num_eval_batches, 'eval')
    model.construct_model(tensors, prefix='metaval_')
    initializers.append(init)
    return model, initializers


def build_model(f, config, test_num_updates, resume_itr, total, placement):
    """(model, next_feed, feed_list, initializers) of the data source."""
    if f.datasource == 'sinusoid':
        generator = data.SinusoidTasks(f.update_batch_size * 2, config.meta_batch_size)
        model = MAML(config, 3 if f.baseline == 'oracle' else 1, 1, test_num_updates,
                     towers=placement.towers, param_device=placement.param_device)
        model.construct_model(prefix='metatrain_')
        if f.train:
            next_feed = lambda itr: sinusoid_feed(f, generator, data.batch_rng(TRAIN_SEED, itr))
        else:
            next_feed = lambda _: sinusoid_feed(f, generator, np.random)
        return model, next_feed, [getattr(model, name) for name in FEED_ORDER], []
    model, initializers = build_image_model(f, config, test_num_updates, resume_itr, total, placement)
    return model, (lambda _: ()), [], initializers


## Putting it together
def run(f):
    check_flags(f)
    placement = devices.make_placement(f)   # impossible device flags fail here, before any folder is made
    if f.baseline == 'oracle':
        # The oracle is trained on the pre-update loss only: its iterations all count as pre-training.
        f.pretrain_iterations += f.metatrain_iterations
        f.metatrain_iterations = 0
    exp_dir = experiment_dir(f)
    if f.train:
        experiment.ensure_writable(exp_dir)
        experiment.lock_experiment(exp_dir)
        checkpoint = experiment.training_checkpoint(exp_dir, f.resume, f.test_iter)
        experiment.record_moments_choice(f.moments_stop_gradient, exp_dir, checkpoint)
    else:
        checkpoint = experiment.evaluation_checkpoint(exp_dir, f.test_iter)
        experiment.ensure_writable(exp_dir)
    resume_itr = checkpoint_iteration(checkpoint) + 1 if checkpoint and f.train else 0
    total = f.pretrain_iterations + f.metatrain_iterations
    if f.train and resume_itr >= total:
        print('Training already finished: {} holds iteration {} of {}; nothing to do.'.format(
            checkpoint, resume_itr - 1, total))
        return

    started = time.time()
    tf.get_logger().setLevel('ERROR')
    tf1.disable_eager_execution()
    tf1.reset_default_graph()
    tf1.set_random_seed(TRAIN_SEED)
    meta_batch_size = f.meta_batch_size if f.train else 1   # always a meta batch of 1 when testing
    test_num_updates = test_num_updates_for(f.datasource, f.train)
    config = ModelConfig(datasource=f.datasource, num_classes=f.num_classes, meta_batch_size=meta_batch_size,
                         meta_lr=f.meta_lr, update_batch_size=f.update_batch_size, update_lr=f.update_lr,
                         num_updates=f.num_updates, norm=f.norm, num_filters=f.num_filters, conv=f.conv,
                         max_pool=f.max_pool, stop_grad=f.stop_grad, moments_stop_gradient=f.moments_stop_gradient,
                         pretraining=f.pretrain_iterations > 0, fast_paths=f.fast_paths)
    with devices.model_placement(placement):   # a cluster's savers must run where the weights are: the chief
        model, next_feed, feed_list, initializers = build_model(f, config, test_num_updates, resume_itr, total,
                                                                placement)
        saver = tf1.train.Saver(tf1.global_variables(), max_to_keep=None)   # save_checkpoint keeps the newest 10
        print('Data and graph ready in {:.1f} s'.format(time.time() - started), flush=True)
        sess = placement.session()
        # One run for the weights and the images: each run of a new set of ops prepares its own executor.
        sess.run([tf1.global_variables_initializer()] + [op for op, _ in initializers],
                 {placeholder: value for _, feed in initializers for placeholder, value in feed.items()})
        del initializers   # the images now live in the session only
        if checkpoint:
            print('Restoring model weights from ' + checkpoint)
            full = experiment.restore(sess, checkpoint, full_state=f.train)
            if f.train and not full:
                print('(weights only: the optimizer state starts fresh)')
    val_enabled = f.datasource != 'sinusoid'
    if f.train:
        train(model, sess, saver, f, exp_dir, resume_itr, next_feed, feed_list, val_enabled, placement, checkpoint)
    else:
        test(model, sess, f, exp_dir, next_feed, feed_list)


def main(argv):
    del argv
    try:
        if FLAGS.job_name:
            check_flags(FLAGS)
            devices.serve_worker(FLAGS.cluster, FLAGS.task_index)
            return
        run(FLAGS)
    except UserError as error:
        print('error: ' + str(error), file=sys.stderr)
        if devices.chief_server_running():
            # The chief's gRPC server can wait forever at exit for a lost worker's calls; everything
            # worth keeping is on disk already (checkpoints are renamed into place, the lock is an flock).
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        sys.exit(2)


if __name__ == '__main__':
    app.run(main)
