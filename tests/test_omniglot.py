"""Omniglot end to end: on the real subset in tests/data/omniglot (prepared as users prepare the full
set), on a stand-in made of it with as many characters as main.py's split needs, and (slow) on the
full set where it is given.

1. the 1100/100/423 character split, independent of the folder listing order;
2. the task sampler (ImageTasks.index_dataset), decoded and checked task by task and statistically,
   plus the pixels that make_input_tensors feeds the model;
3. short training runs of main.py, then their evaluation on the test set;
4. data errors: one `error:` line naming the preparation command, never a traceback.
"""
import csv
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import data_generator as data  # noqa: E402
from tests.cli import ENV as SUBPROCESS_ENV, main_command, run_main  # noqa: E402
from tests.conftest import OMNIGLOT_SUBSET, STANDIN_DRAWINGS  # noqa: E402
from experiment import UserError  # noqa: E402

tf1 = tf.compat.v1
PREPARE = 'prepare_omniglot.py'
NUM_CHARACTERS, PER_CLASS, SIDE = 1623, 20, 28


def chi2_bound(df):
    """About the 1 - 1e-6 quantile of chi-square(df) (Wilson-Hilferty): fails only a broken sampler."""
    z = 4.75
    return df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3


def chi2(counts):
    counts = np.asarray(counts, float)
    expected = counts.sum() / len(counts)
    return float(np.sum((counts - expected) ** 2 / expected))


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope='module')
def folders(omniglot_subset_root):
    """The subset's 54 character folders, in the split's order."""
    return data.omniglot_character_folders(str(omniglot_subset_root))


@pytest.fixture(scope='module')
def train_folders(folders):
    return folders


@pytest.fixture(scope='module')
def train_set(train_folders):
    return data.load_image_dataset('omniglot', train_folders, SIDE, 1)


def omniglot_tasks(dataset, num_classes, k_shot, batch_size, seed):
    return data.ImageTasks(dataset, num_classes, k_shot, 2 * k_shot, batch_size,
                           rotate=True, invert=True, seed=seed)


def draw(tasks, first, num_batches):
    """Runs index_dataset(first, num_batches) in a graph session: ([n, B, R*N] index, label)."""
    with tf.Graph().as_default():
        element = tf1.data.make_one_shot_iterator(tasks.index_dataset(first, num_batches)).get_next()
        with tf1.Session() as sess:
            batches = [sess.run(element) for _ in range(num_batches)]
            with pytest.raises(tf.errors.OutOfRangeError):   # exactly num_batches batches
                sess.run(element)
    return np.stack([b[0] for b in batches]), np.stack([b[1] for b in batches])


def decode(image_index, num_total, per_class=PER_CLASS):
    drawing = image_index % per_class
    char = (image_index // per_class) % num_total
    rotation = image_index // (per_class * num_total)
    return rotation, char, drawing


# ------------------------------------------------------------------------------------------ 1. split
@pytest.fixture(scope='module')
def full_layout(tmp_path_factory):
    """The full set's layout without its images: 50 alphabets, 1623 character folders."""
    root = tmp_path_factory.mktemp('layout') / 'omniglot_resized'
    for i in range(NUM_CHARACTERS):
        (root / 'Alphabet_{:02d}'.format(i % 50) / 'character{:02d}'.format(i // 50 + 1)).mkdir(parents=True)
    return root


def test_split_sizes_disjoint_and_listing_order_independent(full_layout, monkeypatch):
    root = str(full_layout)
    folders = data.omniglot_character_folders(root)
    assert len(folders) == NUM_CHARACTERS and len(set(folders)) == NUM_CHARACTERS
    splits = {s: data.omniglot_split(folders, s) for s in ('train', 'val', 'test')}
    assert [len(splits[s]) for s in ('train', 'val', 'test')] == [1100, 100, 423]
    sets = {s: set(v) for s, v in splits.items()}
    assert not (sets['train'] & sets['val']) and not (sets['train'] & sets['test'])
    assert not (sets['val'] & sets['test'])
    assert sets['train'] | sets['val'] | sets['test'] == set(folders)

    # The definition: sorted paths, then random.Random(1).shuffle.
    import random
    expected = sorted(str(p) for p in Path(root).glob('*/*') if p.is_dir())
    random.Random(1).shuffle(expected)
    assert folders == expected
    assert folders != sorted(folders)   # really shuffled

    real_listdir = os.listdir
    monkeypatch.setattr(os, 'listdir', lambda path='.': list(reversed(sorted(real_listdir(path)))))
    assert data.omniglot_character_folders(root) == folders
    for s in ('train', 'val', 'test'):
        assert data.omniglot_split(data.omniglot_character_folders(root), s) == splits[s]


# ------------------------------------------------------------------------------------------ 2. sampler
@pytest.mark.parametrize('num_classes, k_shot, batch_size, num_batches', [(5, 1, 50, 6), (20, 5, 25, 8)])
def test_sampler_task_structure_and_statistics(train_set, num_classes, k_shot, batch_size, num_batches):
    N, K, R = num_classes, k_shot, 2 * k_shot
    num_total = train_set.num_classes
    assert num_total == OMNIGLOT_SUBSET.characters
    assert train_set.pixels.shape == (num_total, PER_CLASS, SIDE * SIDE)
    tasks = omniglot_tasks(train_set, N, K, batch_size, seed=5)
    index, label = draw(tasks, 0, num_batches)
    assert index.shape == label.shape == (num_batches, batch_size, R * N)
    T = num_batches * batch_size
    index = index.reshape(T, R, N).astype(np.int64)
    label = label.reshape(T, R, N)
    assert index.min() >= 0 and index.max() < 4 * num_total * PER_CLASS
    rotation, char, drawing = decode(index, num_total)

    # Every round holds every class once: labels balanced, K of each in support, R-K in query.
    assert (np.sort(label, -1) == np.arange(N)).all()
    support, query = label[:, :K].reshape(T, -1), label[:, K:].reshape(T, -1)
    for c in range(N):
        assert ((support == c).sum(1) == K).all() and ((query == c).sum(1) == R - K).all()

    # Per class (= label): one character, one rotation, R different drawings.
    order = np.argsort(label, -1)
    char_of = np.take_along_axis(char, order, -1)        # [T, R, N] by label
    rot_of = np.take_along_axis(rotation, order, -1)
    drawing_of = np.take_along_axis(drawing, order, -1)
    assert (char_of == char_of[:, :1]).all()
    assert (rot_of == rot_of[:, :1]).all()
    chars, rots = char_of[:, 0], rot_of[:, 0]             # [T, N]
    assert (np.diff(np.sort(chars, -1), axis=-1) > 0).all()   # N distinct characters
    assert (np.diff(np.sort(drawing_of, 1), axis=1) > 0).all()   # no drawing twice in a task
    for t in range(T):                                  # support and query disjoint
        assert not set(index[t, :K].ravel()) & set(index[t, K:].ravel())
        assert len(set(index[t].ravel())) == R * N

    # Distributions: rotations, drawings, characters, labels ~ uniform; classes not in label order.
    rotation_counts = np.bincount(rots.ravel(), minlength=4)
    assert len(rotation_counts) == 4 and chi2(rotation_counts) < chi2_bound(3), rotation_counts
    assert (rotation_counts > 0.2 * rots.size).all()
    drawing_counts = np.bincount(drawing_of.ravel(), minlength=PER_CLASS)
    assert chi2(drawing_counts) < chi2_bound(PER_CLASS - 1), drawing_counts
    char_bins = np.bincount(chars.ravel() * 10 // num_total, minlength=10)
    assert chi2(char_bins) < chi2_bound(9), char_bins
    assert chars.min() < 0.05 * num_total and chars.max() > 0.95 * num_total
    assert len(np.unique(chars)) > 0.5 * min(chars.size, num_total)
    first_slot = np.bincount(label[:, :, 0].ravel(), minlength=N)   # the class at slot 0 of a round
    assert chi2(first_slot) < chi2_bound(N - 1), first_slot
    rank_of_label0 = (chars < chars[:, :1]).sum(1)       # where label 0's character ranks
    assert chi2(np.bincount(rank_of_label0, minlength=N)) < chi2_bound(N - 1)
    # Each round has its own random order of the classes.
    same_order = (label[:, 1:] == label[:, :1]).all(-1).mean()
    assert same_order < 0.05, same_order


def test_sampler_is_a_function_of_seed_and_batch_number(train_set):
    tasks = omniglot_tasks(train_set, 5, 1, 4, seed=5)
    index, label = draw(tasks, 0, 6)
    resumed_index, resumed_label = draw(omniglot_tasks(train_set, 5, 1, 4, seed=5), 3, 3)
    np.testing.assert_array_equal(resumed_index, index[3:])
    np.testing.assert_array_equal(resumed_label, label[3:])
    for a in range(6):
        for b in range(a + 1, 6):
            assert not np.array_equal(index[a], index[b])
    other_index, _ = draw(omniglot_tasks(train_set, 5, 1, 4, seed=6), 0, 6)
    assert not np.array_equal(other_index, index)
    # The tasks inside one batch differ too.
    assert len({tuple(t) for t in index.reshape(-1, 10)}) == 24


def test_sampler_does_not_autotune(train_set):
    # tf.data's autotuning thread sleeps up to a minute between wake-ups, and closing the session
    # waits for it: a long training run took minutes to exit after its last checkpoint.
    with tf.Graph().as_default():
        assert omniglot_tasks(train_set, 5, 1, 4, seed=5).index_dataset(0, 3).options().autotune.enabled is False


def decoded_as_the_reference(paths):
    """What the reference feeds for each file: tf.image.decode_png, /255, then 1 - x."""
    with tf.Graph().as_default():
        path = tf1.placeholder(tf.string, [])
        image = 1.0 - tf.cast(tf.image.decode_png(tf.io.read_file(path)), tf.float32) / 255.0
        with tf1.Session() as sess:
            return {p: sess.run(image, {path: p})[:, :, 0] for p in paths}


def sampled_images_against_files(dataset, class_folders, seed):
    """Draws 3 batches of 4 5-way 1-shot tasks through make_input_tensors and checks every image
    against the reference's decoding of its file, turned by its class's rotation.

    Returns the rotations seen and how many rotated images differ from the unrotated file."""
    N, K, B, first, n = 5, 1, 4, 2, 3
    tasks = omniglot_tasks(dataset, N, K, B, seed=seed)
    index, label = draw(tasks, first, n)
    with tf.Graph().as_default():
        tensors, (init_op, feed) = tasks.make_input_tensors(first, n, 'probe')
        assert tensors['inputa'].shape.as_list()[1:] == [N * K, SIDE * SIDE]
        with tf1.Session() as sess:
            sess.run(init_op, feed)
            batches = [sess.run(tensors) for _ in range(n)]
    files = [sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith('.png'))
             for folder in class_folders]
    assert all(len(f) == PER_CLASS for f in files)
    reference = decoded_as_the_reference([p for class_files in files for p in class_files])
    rotations_seen, rotated_differs = set(), 0
    for i, batch in enumerate(batches):
        images = np.concatenate([batch['inputa'], batch['inputb']], 1)
        labels = np.concatenate([batch['labela'], batch['labelb']], 1)
        assert images.shape == (B, 2 * N, SIDE * SIDE) and labels.shape == (B, 2 * N, N)
        assert (labels.sum(-1) == 1).all() and set(np.unique(labels)) == {0.0, 1.0}
        np.testing.assert_array_equal(labels.argmax(-1), label[i])
        for b in range(B):
            for e in range(2 * N):
                k, c, d = (int(v) for v in decode(int(index[i, b, e]), dataset.num_classes))
                expected = np.rot90(reference[files[c][d]], k)
                np.testing.assert_array_equal(images[b, e].reshape(SIDE, SIDE), expected)
                rotations_seen.add(k)
                rotated_differs += k != 0 and not np.array_equal(expected, reference[files[c][d]])
    return rotations_seen, rotated_differs


def test_input_pixels_are_the_references_decoding_of_1bit_pngs(train_set, train_folders):
    """The prepared files are 1-bit PNGs: the network sees exactly 0 (stroke) and 1 (background)."""
    with Image.open(os.path.join(train_folders[0], sorted(os.listdir(train_folders[0]))[0])) as image:
        assert image.mode == '1' and image.size == (SIDE, SIDE)
    rotations_seen, rotated_differs = sampled_images_against_files(train_set, train_folders, seed=11)
    assert rotations_seen == {0, 1, 2, 3}
    assert rotated_differs > 10
    assert set(np.unique(train_set.pixels)) == {0, 255}


def test_input_pixels_are_the_references_decoding_of_8bit_pngs(train_folders, tmp_path):
    """8-bit grayscale files (e.g. resized by another tool) keep all their gray levels."""
    rng = np.random.RandomState(0)
    folders = []
    for i, folder in enumerate(train_folders[:8]):
        copy = tmp_path / 'alphabet' / 'character{:02d}'.format(i)
        copy.mkdir(parents=True)
        for name in sorted(os.listdir(folder)):
            with Image.open(os.path.join(folder, name)) as image:
                gray = np.asarray(image.convert('L')).astype(np.int64)
            gray = np.clip(gray - rng.randint(0, 200, gray.shape) * (gray > 0), 0, 255).astype(np.uint8)
            Image.fromarray(gray, 'L').save(copy / name)
        folders.append(str(copy))
    dataset = data.load_image_dataset('omniglot', folders, SIDE, 1)
    assert len(np.unique(dataset.pixels)) > 100
    rotations_seen, _ = sampled_images_against_files(dataset, folders, seed=3)
    assert len(rotations_seen) >= 3


def test_rot90_is_the_turn_of_tf_image_and_pil(train_folders):
    """np.rot90 by k (the sampler's table) == k quarter turns counter-clockwise, as PIL ROTATE_90."""
    path = os.path.join(train_folders[0], sorted(os.listdir(train_folders[0]))[0])
    with Image.open(path) as image:
        stored = np.asarray(image.convert('L'))
        turned = image.convert('L')
        for k in range(1, 4):
            turned = turned.transpose(Image.Transpose.ROTATE_90)
            np.testing.assert_array_equal(np.asarray(turned), np.rot90(stored, k))
            np.testing.assert_array_equal(tf.image.rot90(stored[:, :, None], k).numpy()[:, :, 0],
                                          np.rot90(stored, k))


# ------------------------------------------------------------------------------------------ 3. training
# The paper's 5-way 1-shot command (meta batch 32, one inner step of 0.4), shortened. With the pixels
# the reference feeds (0 stroke, 1 background) it learns from the start; measured here (2-core AMD
# EPYC, oneDNN): training post-update accuracy 0.35 / 0.47 / 0.62 at iterations 100 / 200 / 300 and
# validation 0.625 at iteration 500 (chance: 0.2).
TRAIN_ITERATIONS = 501
K_SHOT = 1
OMNIGLOT_FLAGS = ['--datasource=omniglot', '--meta_batch_size=32', '--update_batch_size=%d' % K_SHOT,
                  '--update_lr=0.4', '--num_updates=1']
TRAIN_FLAGS = ['--metatrain_iterations={}'.format(TRAIN_ITERATIONS)]
EXPERIMENT = 'cls_5.mbs_32.ubs_1.numstep1.updatelr0.4batchnorm'
RESULTS = 'test_ubs1_stepsize0.4'
QUERY_PER_TASK = 5 * K_SHOT
# The same command, smaller (meta batch 4, 16 filters): for the stand-in.
SMALL_FLAGS = ['--datasource=omniglot', '--meta_batch_size=4', '--update_batch_size=1', '--update_lr=0.4',
               '--num_updates=1', '--num_filters=16']
SMALL_EXPERIMENT = 'cls_5.mbs_4.ubs_1.numstep1.updatelr0.4hidden16batchnorm'


def progress_lines(stdout):
    """[(iteration, pre, post)] of main.py's `Iteration N: pre, post` lines."""
    return [(int(i), float(pre), float(post))
            for i, pre, post in re.findall(r'^Iteration (\d+): (\S+), (\S+)$', stdout, re.M)]


def evaluation_results(exp_dir):
    """(means, stds, ci95, per-task values [600, 11]) of an evaluation, checked against each other."""
    with open(exp_dir / (RESULTS + '.csv'), newline='') as f:
        rows = list(csv.reader(f))
    assert rows[0] == ['update{}'.format(i) for i in range(11)]
    assert len(rows) == 4 and all(len(r) == 11 for r in rows)
    means, stds, ci95 = (np.array(r, float) for r in rows[1:])
    with open(exp_dir / (RESULTS + '.pkl'), 'rb') as f:
        values = pickle.load(f)['mses']
    assert values.shape == (600, 11)
    np.testing.assert_allclose(values * QUERY_PER_TASK, np.round(values * QUERY_PER_TASK), atol=1e-3)
    np.testing.assert_allclose(means, values.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stds, values.std(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ci95, 1.96 * values.std(0) / np.sqrt(600), rtol=1e-4, atol=1e-6)
    assert len({tuple(row) for row in values}) > 20   # 600 different tasks, not one repeated
    return means, stds, ci95, values


@pytest.mark.slow
def test_short_training_learns_and_evaluation_writes_results(omniglot_root, tmp_path):
    data_root, logdir = str(Path(omniglot_root).parent), str(tmp_path / 'logs')
    common = OMNIGLOT_FLAGS + TRAIN_FLAGS + ['--data_root=' + data_root, '--logdir=' + logdir]
    trained = run_main(*common, timeout=900)
    assert trained.returncode == 0, trained.stderr[-3000:]
    lines = progress_lines(trained.stdout)
    assert [i for i, _, _ in lines] == list(range(100, TRAIN_ITERATIONS, 100)), trained.stdout
    validation = re.findall(r'^Validation results: (\S+), (\S+)$', trained.stdout, re.M)
    assert len(validation) == 1, trained.stdout
    assert float(validation[0][1]) > 0.45, trained.stdout    # 32 tasks x 5 query images, chance 0.2
    assert max(post for _, _, post in lines[:3]) > 0.3, trained.stdout    # learning from the first hundreds
    exp_dir = Path(logdir) / EXPERIMENT
    assert (exp_dir / 'model{}.index'.format(TRAIN_ITERATIONS - 1)).is_file()
    assert_tensorboard_events(exp_dir, reported=range(0, TRAIN_ITERATIONS, 100))

    tested = run_main('--train=False', '--test_set=True', *common, timeout=900)
    assert tested.returncode == 0, tested.stderr[-3000:]
    assert 'Restoring model weights from {}'.format(exp_dir / 'model{}'.format(TRAIN_ITERATIONS - 1)) \
        in tested.stdout
    means, _, _, _ = evaluation_results(exp_dir)
    assert abs(means[0] - 0.2) < 0.05, means          # before adapting: chance
    assert means[1] > 0.45 and means[1] > means[0] + 0.2, means
    assert means[3] >= means[1] - 0.02, means          # the paper's 3 steps do not undo the first


def test_training_and_evaluation_on_the_standin(omniglot_standin_root, tmp_path):
    """main.py trains (summaries, checkpoints, progress lines) and evaluates 600 test tasks."""
    logdir = tmp_path / 'logs'
    common = SMALL_FLAGS + ['--data_root=' + str(omniglot_standin_root), '--logdir=' + str(logdir)]
    trained = run_main(*common, '--metatrain_iterations=301')
    assert trained.returncode == 0, trained.stderr[-3000:]
    lines = progress_lines(trained.stdout)
    assert [i for i, _, _ in lines] == [100, 200, 300], trained.stdout
    assert re.search(r'^    \d+\.\d it/s, 0:\d\d:\d\d left$', trained.stdout, re.M), trained.stdout
    exp_dir = logdir / SMALL_EXPERIMENT
    assert sorted(p.name for p in exp_dir.glob('model*.index')) == ['model300.index']
    assert_tensorboard_events(exp_dir, reported=range(0, 301, 100))

    tested = run_main('--train=False', '--test_set=True', *common, '--metatrain_iterations=301')
    assert tested.returncode == 0, tested.stderr[-3000:]
    assert 'Restoring model weights from {}'.format(exp_dir / 'model300') in tested.stdout
    means, _, _, _ = evaluation_results(exp_dir)
    assert abs(means[0] - 0.2) < 0.05, means          # before adapting: chance
    assert means[1] > means[0] + 0.1, means           # it learnt to adapt


def assert_tensorboard_events(exp_dir, reported):
    """One events file: the graph and its meta graph (as the reference's FileWriter writes them), then
    at every reported iteration the training and the validation summaries."""
    files = list(exp_dir.glob('events.out.tfevents.*'))
    assert len(files) == 1, files
    events = list(tf.compat.v1.train.summary_iterator(str(files[0])))
    assert [e.WhichOneof('what') for e in events[:3]] == ['file_version', 'graph_def', 'meta_graph_def']
    graph = tf.compat.v1.GraphDef.FromString(events[1].graph_def)
    assert any(node.op == 'Conv2D' for node in graph.node)
    meta_graph = tf.compat.v1.MetaGraphDef.FromString(events[2].meta_graph_def)
    assert {'trainable_variables', 'variables', 'summaries'} <= set(meta_graph.collection_def)
    summaries = [(e.step, {v.tag.split('_')[0] for v in e.summary.value}) for e in events[3:]]
    assert summaries == [(itr, {prefix}) for itr in reported for prefix in ('metatrain', 'metaval')]


@pytest.mark.slow
def test_a_resumed_run_validates_on_the_tasks_of_an_uninterrupted_one(omniglot_standin_root, tmp_path):
    """The validation stream continues where the interrupted run left it (not from its start), so
    a resumed run prints the validation numbers of the same tasks, with the same weights."""
    tiny = ['--datasource=omniglot', '--meta_batch_size=4', '--update_batch_size=1', '--num_updates=1',
            '--num_filters=4', '--data_root=' + str(omniglot_standin_root)]

    def validation_lines(logdir, iterations):
        result = run_main(*tiny, '--metatrain_iterations=%d' % iterations, '--logdir=' + str(logdir))
        assert result.returncode == 0, result.stderr[-3000:]
        return re.findall(r'^(Iteration \d+: .*|Validation results: .*)$', result.stdout, re.M)

    whole = validation_lines(tmp_path / 'whole', 501)
    first = validation_lines(tmp_path / 'resumed', 301)      # stops with model300
    rest = validation_lines(tmp_path / 'resumed', 501)       # resumes at iteration 301
    assert sum(line.startswith('Validation') for line in whole) == 1
    assert first + rest == whole


def test_validation_batches_before_counts_what_training_draws():
    """What a resumed run skips of the validation stream: one batch per summary (every 100 iterations,
    with --log) and one per printed validation (every 500), before the iteration it resumes at."""
    import main
    assert main.validation_batches_before(0, 'omniglot', True) == 0
    assert main.validation_batches_before(1, 'omniglot', True) == 1                  # iteration 0's summary
    assert main.validation_batches_before(301, 'omniglot', True) == 4               # 0, 100, 200, 300
    assert main.validation_batches_before(501, 'omniglot', True) == 6 + 1           # and the validation at 500
    assert main.validation_batches_before(501, 'omniglot', False) == 1              # without summaries


# ------------------------------------------------------------------------------------------ 4. errors
@pytest.fixture(scope='module')
def error_runs(omniglot_standin_root, folders, tmp_path_factory):
    """Builds the broken data roots and runs main.py on all of them at once (saves a few TF start-ups)."""
    base = tmp_path_factory.mktemp('errors')
    standin = omniglot_standin_root / 'omniglot_resized'
    roots = {'missing': base / 'empty', 'few': base / 'few', 'bad_size': base / 'bad_size',
             'many_classes': omniglot_standin_root}
    roots['missing'].mkdir()
    for folder in map(Path, folders[:7]):
        shutil.copytree(folder, roots['few'] / 'omniglot_resized' / folder.parent.name / folder.name)
    # The stand-in as links, except the first training character: one image there is 27x28.
    bad_root = roots['bad_size'] / 'omniglot_resized'
    standin_folders = data.omniglot_character_folders(str(standin))
    bad_folder = Path(standin_folders[0])
    for folder in map(Path, standin_folders):
        (bad_root / folder.parent.name).mkdir(parents=True, exist_ok=True)
        if folder != bad_folder:
            (bad_root / folder.parent.name / folder.name).symlink_to(folder, target_is_directory=True)
    copy = Path(shutil.copytree(bad_folder, bad_root / bad_folder.parent.name / bad_folder.name, symlinks=False))
    bad_image = sorted(copy.glob('*.png'))[STANDIN_DRAWINGS - 1]
    bad_image.unlink()
    Image.new('1', (27, 28), 1).save(bad_image)
    assert data.omniglot_character_folders(str(bad_root))[0] == str(copy)

    processes = {}
    for name, root in roots.items():
        extra = ['--num_classes=2000'] if name == 'many_classes' else []
        processes[name] = subprocess.Popen(
            main_command('--metatrain_iterations=1', '--data_root=' + str(root),
                         '--logdir=' + str(base / ('logs_' + name)), *(OMNIGLOT_FLAGS + extra)),
            cwd=str(REPO), env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        results[name] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    results['paths'] = {'empty': roots['missing'], 'bad_image': bad_image}
    return results


@pytest.fixture
def assert_user_error(one_line_error):
    """one_line_error, and nothing trained."""
    def check(result, *fragments):
        line = one_line_error(result, *fragments)
        assert 'Done initializing' not in result.stdout
        return line
    return check


def test_missing_data_folder(error_runs, assert_user_error):
    empty = error_runs['paths']['empty']
    assert_user_error(error_runs['missing'], PREPARE, str(empty / 'omniglot_resized'))


def test_too_few_characters(error_runs, assert_user_error):
    assert_user_error(error_runs['few'], PREPARE, 'found 7 character folders')


def test_wrong_image_size_end_to_end(error_runs, assert_user_error):
    assert_user_error(error_runs['bad_size'], PREPARE, str(error_runs['paths']['bad_image']), '27x28')


def test_more_classes_than_the_split_has(error_runs, assert_user_error):
    # Not a preparation problem (the full set has only 1100 training characters): the message names
    # the flag and the number of classes instead.
    assert_user_error(error_runs['many_classes'], '--num_classes=2000', '1100')


def test_read_image_rejects_bad_files(folders, tmp_path):
    good = sorted(Path(folders[0]).glob('*.png'))[0]
    pixels = data._read_image(str(good), SIDE, 1, 'omniglot')
    assert pixels.dtype == np.uint8 and pixels.shape == (SIDE * SIDE,) and set(np.unique(pixels)) == {0, 255}

    gray = tmp_path / 'gray.png'                     # 8-bit grayscale is fine too: 0..255
    Image.new('L', (SIDE, SIDE), 200).save(gray)
    assert (data._read_image(str(gray), SIDE, 1, 'omniglot') == 200).all()

    cases = {'small.png': Image.new('1', (27, 28), 1), 'big.png': Image.new('L', (32, 32), 0),
             'rgb.png': Image.new('RGB', (SIDE, SIDE), (255, 255, 255))}
    for name, image in cases.items():
        image.save(tmp_path / name)
    (tmp_path / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'not really a png' * 20)
    (tmp_path / 'truncated.png').write_bytes(good.read_bytes()[:60])
    for name in ('small.png', 'big.png', 'rgb.png', 'corrupt.png', 'truncated.png'):
        path = str(tmp_path / name)
        with pytest.raises(UserError) as raised:
            data._read_image(path, SIDE, 1, 'omniglot')
        message = str(raised.value)
        assert path in message and PREPARE in message, message
        assert '\n' not in message
    # A whole class folder with one bad image: load_image_dataset names that image.
    folder = tmp_path / 'alphabet' / 'character01'
    shutil.copytree(folders[0], folder)
    bad = sorted(folder.glob('*.png'))[5]
    Image.new('RGB', (SIDE, SIDE)).save(bad)
    with pytest.raises(UserError, match=re.escape(str(bad))):
        data.load_image_dataset('omniglot', [str(folder)], SIDE, 1)
    with pytest.raises(UserError, match=PREPARE):
        data.load_image_dataset('omniglot', [], SIDE, 1)


def test_decoded_pixels_are_cached_and_a_changed_file_invalidates_the_cache(train_folders, tmp_path, monkeypatch):
    from data_generator import load_image_dataset
    folders = []
    for i, folder in enumerate(train_folders[:6]):
        copy = tmp_path / 'chars' / '{}_{}'.format(i, Path(folder).name)
        shutil.copytree(folder, copy)
        folders.append(str(copy))
    cache = tmp_path / 'cache'
    first = load_image_dataset('omniglot', folders, 28, 1, str(cache))
    assert len(list(cache.glob('*.npy'))) == 1

    def no_decoding(path, *args):
        raise AssertionError('decoded {} again instead of reading the cache'.format(path))
    with monkeypatch.context() as patched:
        patched.setattr(data, '_read_image', no_decoding)
        again = load_image_dataset('omniglot', folders, 28, 1, str(cache))     # read from the cache alone
        with pytest.raises(AssertionError, match='decoded'):                     # without one it decodes
            load_image_dataset('omniglot', folders, 28, 1)
    np.testing.assert_array_equal(again.pixels, first.pixels)
    np.testing.assert_array_equal(load_image_dataset('omniglot', folders, 28, 1).pixels, first.pixels)
    victim = sorted(Path(folders[0]).glob('*.png'))[0]
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(victim)       # different content and size
    changed = load_image_dataset('omniglot', folders, 28, 1, str(cache))
    assert len(list(cache.glob('*.npy'))) == 2
    assert changed.pixels[0, 0].sum() == 0 and first.pixels[0, 0].sum() > 0


def test_a_cache_written_by_the_old_pixel_format_is_never_reused(train_folders, tmp_path, monkeypatch):
    """Caches from before 1-bit PNGs decoded to 0/255 held 0/1 pixels under a key without a format."""
    folders = [str(shutil.copytree(f, tmp_path / 'chars' / str(i))) for i, f in enumerate(train_folders[:3])]
    cache = tmp_path / 'cache'
    monkeypatch.setattr(data, 'PIXEL_FORMAT', 1)
    monkeypatch.setattr(data, '_read_image', lambda path, *args: (
        np.asarray(Image.open(path)).astype(np.uint8).reshape(-1)))   # how format 1 decoded: 0/1
    old = data.load_image_dataset('omniglot', folders, SIDE, 1, str(cache))
    assert set(np.unique(old.pixels)) == {0, 1}
    monkeypatch.undo()
    new = data.load_image_dataset('omniglot', folders, SIDE, 1, str(cache))
    assert set(np.unique(new.pixels)) == {0, 255}
    assert len(list(cache.glob('*.npy'))) == 2
