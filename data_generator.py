"""Tasks for meta-learning: sinusoid regression (numpy) and few-shot image classification (tf.data).

Every batch of tasks is a pure function of (seed, batch number), so a resumed run draws exactly
the batches an uninterrupted one would have drawn.
"""
import concurrent.futures
import hashlib
import os
import random

import numpy as np
import tensorflow as tf

from experiment import PREPARE_HINT, UserError

tf1 = tf.compat.v1

OMNIGLOT_SPLIT_SEED = 1
OMNIGLOT_NUM_TRAIN, OMNIGLOT_NUM_VAL = 1100, 100
# Part of the pixel cache's key: a change to how files decode must never reuse an older cache.
# Version 2: 1-bit PNGs decode to 0/255 (version 1 cached them as 0/1).
PIXEL_FORMAT = 2


## Sinusoid
class SinusoidTasks:
    """y = A sin(x - phase), A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5]; 2K points per task."""
    amp_range = (0.1, 5.0)
    phase_range = (0.0, np.pi)
    input_range = (-5.0, 5.0)
    dim_input = dim_output = 1

    def __init__(self, num_samples_per_class, batch_size):
        self.num_samples_per_class = num_samples_per_class
        self.batch_size = batch_size

    def generate(self, rng=np.random):
        """(inputs, outputs, amplitudes, phases), drawn in the reference's order: amplitudes,
        phases, then each task's inputs (one call for all tasks draws the same numbers)."""
        amp = rng.uniform(*self.amp_range, [self.batch_size])
        phase = rng.uniform(*self.phase_range, [self.batch_size])
        inputs = rng.uniform(*self.input_range, [self.batch_size, self.num_samples_per_class, 1])
        outputs = amp[:, None, None] * np.sin(inputs - phase[:, None, None])
        return inputs, outputs, amp, phase


def batch_rng(seed, itr):
    """The random state of training batch `itr`: resuming at any iteration redraws the same data."""
    return np.random.RandomState(np.uint32((seed * 1000003 + itr) % (2 ** 32)))


def split_support_query(inputs, outputs, num_support):
    """The first K points (per class) of each task adapt the model (a); the rest evaluate it (b)."""
    return {'inputa': inputs[:, :num_support], 'labela': outputs[:, :num_support],
            'inputb': inputs[:, num_support:], 'labelb': outputs[:, num_support:]}


def with_oracle_inputs(inputs, amp, phase):
    """The oracle baseline sees each task's amplitude and phase as two extra inputs."""
    extra = np.broadcast_to(np.stack([amp, phase], -1)[:, None, :], inputs.shape[:2] + (2,))
    return np.concatenate([inputs, extra], 2)


## Images
class ImageDataset:
    """All images of one split in memory: pixels [classes, images per class, H*W*C] uint8."""

    def __init__(self, pixels, class_names):
        self.pixels = pixels
        self.class_names = class_names

    @property
    def num_classes(self):
        return self.pixels.shape[0]


def omniglot_character_folders(root):
    """All character folders, sorted then shuffled with seed 1 (independent of listing order)."""
    _require_folder(root, 'omniglot')
    folders = sorted(os.path.join(root, alphabet, char)
                     for alphabet in os.listdir(root) if os.path.isdir(os.path.join(root, alphabet))
                     for char in os.listdir(os.path.join(root, alphabet))
                     if os.path.isdir(os.path.join(root, alphabet, char)))
    random.Random(OMNIGLOT_SPLIT_SEED).shuffle(folders)
    return folders


def omniglot_split(folders, split):
    needed = OMNIGLOT_NUM_TRAIN + OMNIGLOT_NUM_VAL + 1
    if len(folders) < needed:
        raise UserError('omniglot: found {} character folders, the 1100/100/rest split needs at least {}; '
                        'prepare the full set with: {}'.format(len(folders), needed, PREPARE_HINT['omniglot']))
    train_end = OMNIGLOT_NUM_TRAIN
    val_end = train_end + OMNIGLOT_NUM_VAL
    return {'train': folders[:train_end], 'val': folders[train_end:val_end], 'test': folders[val_end:]}[split]


def miniimagenet_class_folders(root, split):
    split_dir = os.path.join(root, split)
    _require_folder(split_dir, 'miniimagenet')
    return sorted(os.path.join(split_dir, c) for c in os.listdir(split_dir)
                  if os.path.isdir(os.path.join(split_dir, c)))


def load_image_dataset(datasource, class_folders, image_size, channels, cache_dir=None):
    """Decodes every image of the given class folders once, checking size, mode and count.

    With `cache_dir`, the decoded pixels are kept there and later runs skip the decoding.
    """
    if not class_folders:
        raise UserError('{}: no class folders found; prepare the data with: {}'.format(
            datasource, PREPARE_HINT[datasource]))
    files_per_class = []
    for folder in class_folders:
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(('.png', '.jpg', '.jpeg')))
        if not files:
            raise UserError('{}: no images in {}; prepare the data with: {}'.format(
                datasource, folder, PREPARE_HINT[datasource]))
        files_per_class.append([os.path.join(folder, f) for f in files])
    per_class = _cached_pixels(files_per_class, image_size, channels, datasource, cache_dir)
    counts = {len(images) for images in per_class}
    if len(counts) > 1:
        # Tasks index drawings uniformly; keep the same count in every class.
        smallest = min(counts)
        per_class = [images[:smallest] for images in per_class]
    return ImageDataset(np.stack([np.stack(images) for images in per_class]),
                        [os.path.basename(f) for f in class_folders])


def _cached_pixels(files_per_class, image_size, channels, datasource, cache_dir):
    """Every image's pixels, decoded once and kept in `cache_dir` (if given and writable).

    The cache file is named by a hash of the file names, sizes and modification times, so any
    change to the data makes a new one.
    """
    paths = [p for files in files_per_class for p in files]
    if cache_dir is None:
        return _split_per_class(_decode_all(paths, image_size, channels, datasource), files_per_class)
    signature = hashlib.sha256(repr([(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]
                                    + [image_size, channels, PIXEL_FORMAT]).encode()).hexdigest()[:24]
    cache = os.path.join(cache_dir, signature + '.npy')
    if os.path.isfile(cache):
        try:
            flat = np.load(cache)
            if flat.shape == (len(paths), image_size * image_size * channels):
                return _split_per_class(flat, files_per_class)
        except (OSError, ValueError):
            pass
    flat = _decode_all(paths, image_size, channels, datasource)
    try:
        os.makedirs(cache_dir, exist_ok=True)
        partial = cache + '.partial-%d' % os.getpid()
        with open(partial, 'wb') as f:
            np.save(f, flat)
        os.replace(partial, cache)
    except OSError:
        pass
    return _split_per_class(flat, files_per_class)


def _decode_all(paths, image_size, channels, datasource):
    read = lambda path: _read_image(path, image_size, channels, datasource)
    # PIL decodes without the GIL: threads use every core.
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        return np.stack(list(pool.map(read, paths)))


def _split_per_class(flat, files_per_class):
    bounds = np.cumsum([len(files) for files in files_per_class])[:-1]
    return [list(images) for images in np.split(flat, bounds)]


def _read_image(path, image_size, channels, datasource):
    from PIL import Image
    try:
        with Image.open(path) as image:
            image.load()
            mode, size = image.mode, image.size
            pixels = np.asarray(image)
    except (OSError, SyntaxError, ValueError) as error:
        raise UserError('{}: cannot read image {} ({}); re-run the preparation: {}'.format(
            datasource, path, error, PREPARE_HINT[datasource]))
    expected_modes = ('1', 'L') if channels == 1 else ('RGB',)
    if size != (image_size, image_size) or mode not in expected_modes:
        raise UserError('{}: image {} is {}x{} mode {}, expected {}x{} {}; re-run the preparation: {}'.format(
            datasource, path, size[0], size[1], mode, image_size, image_size,
            ' or '.join(expected_modes), PREPARE_HINT[datasource]))
    if mode == '1':
        # Pillow reads a 1-bit PNG as 0/1; tf.image.decode_png, which the reference used, expands
        # it to 0/255. After /255 and inversion the network must see 1 (stroke) and 0 (background).
        pixels = pixels.astype(np.uint8) * 255
    return pixels.astype(np.uint8).reshape(-1)


def _require_folder(path, datasource):
    if not os.path.isdir(path) or not os.listdir(path):
        raise UserError('{}: data folder {} is missing or empty; prepare it with: {}'.format(
            datasource, path, PREPARE_HINT[datasource]))


class ImageTasks:
    """N-way K-shot tasks from an in-memory ImageDataset, sampled by a tf.data pipeline.

    A task: N classes without replacement (labels 0..N-1 in random order), for Omniglot one
    rotation per class from {0, 90, 180, 270} degrees, `rounds` images per class without
    replacement. Round r holds one image of every class in a fresh random order; the first K
    rounds are the support set (a), the others the query set (b).
    """

    def __init__(self, dataset, num_classes, update_batch_size, rounds, batch_size, rotate, invert, seed):
        if dataset.num_classes < num_classes:
            raise UserError('{} classes in this split but --num_classes={}: use fewer classes or '
                            'more data'.format(dataset.num_classes, num_classes))
        if dataset.pixels.shape[1] < rounds:
            raise UserError('{} images per class but a task needs {} (K support + query); '
                            'lower --update_batch_size'.format(dataset.pixels.shape[1], rounds))
        self.dataset = dataset
        self.num_classes = num_classes
        self.update_batch_size = update_batch_size
        self.rounds = rounds
        self.batch_size = batch_size
        self.rotate = rotate
        self.invert = invert
        self.seed = seed
        self.dim_input = dataset.pixels.shape[2]
        self.dim_output = num_classes

    def index_dataset(self, first_batch, num_batches):
        """tf.data of (image index [B, rounds*N], label [B, rounds*N]) for batches first.. ."""
        batches = tf.data.Dataset.range(first_batch, first_batch + num_batches)
        # No autotuning: there is nothing to tune, and its model thread made closing the session
        # (every run's exit) wait seconds to minutes for the thread's next wake-up.
        options = tf.data.Options()
        options.autotune.enabled = False
        return batches.map(self._sample_batch, num_parallel_calls=1).prefetch(2).with_options(options)

    def _sample_batch(self, batch_number):
        seeds = [tf.stack([tf.constant(self.seed + k, tf.int64), batch_number]) for k in range(4)]
        num_total, per_class = self.dataset.num_classes, self.dataset.pixels.shape[1]
        B, N, R = self.batch_size, self.num_classes, self.rounds
        # top_k of i.i.d. uniforms: a uniformly random ordered subset without replacement.
        classes = tf.math.top_k(tf.random.stateless_uniform([B, num_total], seeds[0]), N).indices
        drawings = tf.math.top_k(tf.random.stateless_uniform([B, N, per_class], seeds[1]), R).indices
        if self.rotate:
            rotations = tf.random.stateless_uniform([B, N], seeds[2], minval=0, maxval=4, dtype=tf.int32)
        else:
            rotations = tf.zeros([B, N], tf.int32)
        slot_class = tf.math.top_k(tf.random.stateless_uniform([B, R, N], seeds[3]), N).indices
        # Example (round r, slot s) is an image of class slot_class[b, r, s], drawing number r.
        rounds = tf.broadcast_to(tf.range(R)[None, :, None], [B, R, N])
        char = tf.gather(classes, slot_class, batch_dims=1)
        rotation = tf.gather(rotations, slot_class, batch_dims=1)
        drawing = tf.gather_nd(drawings, tf.stack([slot_class, rounds], -1), batch_dims=1)
        image_index = (rotation * num_total + char) * per_class + drawing
        return tf.reshape(image_index, [B, R * N]), tf.reshape(slot_class, [B, R * N])

    def pixel_table(self):
        """The images as one [rotations * classes * drawings, D] array (4 rotations for Omniglot)."""
        pixels = self.dataset.pixels
        if not self.rotate:
            return pixels.reshape(-1, pixels.shape[-1])
        side = int(np.sqrt(pixels.shape[-1]))
        square = pixels.reshape(pixels.shape[:2] + (side, side))
        rotated = [np.rot90(square, k, axes=(2, 3)) for k in range(4)]   # counter-clockwise, as tf.image.rot90
        return np.stack(rotated).reshape(-1, side * side)

    def make_input_tensors(self, first_batch, num_batches, name):
        """Graph tensors inputa/inputb/labela/labelb for the model, plus what initialises them.

        The pixels live in a local variable fed once at start-up: not a graph constant (that made
        the reference's graph and events file hundreds of MB) and not part of any checkpoint.
        """
        table = self.pixel_table()
        feed = tf1.placeholder(tf.uint8, table.shape, name=name + '_pixels')
        pixels = tf1.Variable(feed, trainable=False, collections=[tf1.GraphKeys.LOCAL_VARIABLES],
                              name=name + '_pixels')
        iterator = tf1.data.make_one_shot_iterator(self.index_dataset(first_batch, num_batches))
        image_index, labels = iterator.get_next()
        images = tf.cast(tf.gather(pixels, image_index), tf.float32) / 255.0
        if self.invert:
            images = 1.0 - images
        labels = tf.one_hot(labels, self.num_classes)
        num_support = self.num_classes * self.update_batch_size
        tensors = {'inputa': images[:, :num_support], 'inputb': images[:, num_support:],
                   'labela': labels[:, :num_support], 'labelb': labels[:, num_support:]}
        return tensors, (pixels.initializer, {feed: table})
