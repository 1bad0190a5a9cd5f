"""MiniImagenet end to end on a generated stand-in (the real images cannot be redistributed), and the
reference's published model."""
import csv
import pickle
import shutil

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import devices
import experiment
import main
from data_generator import load_image_dataset, miniimagenet_class_folders
from maml import MAML, ModelConfig
from tests.cli import run_main
from tests.conftest import GOLDEN
from tests.standin import make_miniimagenet_prepared

tf1 = tf.compat.v1
ONE_SHOT = ['--datasource=miniimagenet', '--meta_batch_size=4', '--update_batch_size=1', '--update_lr=0.01',
            '--num_updates=5', '--num_classes=5', '--num_filters=32', '--max_pool=True']
EXP = 'cls_5.mbs_4.ubs_1.numstep5.updatelr0.01hidden32maxpoolbatchnorm'
PUBLISHED = GOLDEN / 'reference_checkpoints' / 'miniimagenet1shot'


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    make_miniimagenet_prepared(root / 'miniImagenet', classes=(6, 5, 5), images_per_class=20)
    return root


def test_loader_reads_rgb_84x84_scaled_not_inverted(data_root):
    folders = miniimagenet_class_folders(str(data_root / 'miniImagenet'), 'train')
    dataset = load_image_dataset('miniimagenet', folders, 84, 3)
    assert dataset.pixels.shape == (6, 20, 84 * 84 * 3) and dataset.pixels.dtype == np.uint8
    first = sorted((data_root / 'miniImagenet' / 'train').glob('*/*.jpg'))[0]
    with Image.open(first) as image:
        stored = np.asarray(image.convert('RGB'))
    # The file's own pixels, channel order kept: inverted would be 255 - x, BGR the channels turned.
    np.testing.assert_array_equal(dataset.pixels[0, 0].reshape(84, 84, 3), stored)


def conv_net_in_numpy(images, weights, norm_params):
    """The reference's MiniImagenet network (4 x conv 3x3 + batch norm over the batch + ReLU + 2x2 max
    pool, then a dense head) in numpy, float64: images [N, 84, 84, 3] -> logits [N, 5]."""
    x = images.astype(np.float64)
    for i in range(4):
        kernel, bias, beta = weights['conv%d' % (i + 1)], weights['b%d' % (i + 1)], norm_params[i]['beta']
        padded = np.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
        n, h, w, c = x.shape
        patches = np.stack([padded[:, r:r + h, s:s + w, :] for r in range(3) for s in range(3)], 3)   # [n,h,w,9,c]
        x = np.einsum('nhwkc,kcf->nhwf', patches, kernel.reshape(9, c, -1)) + bias
        mean, variance = x.mean((0, 1, 2)), x.var((0, 1, 2))
        x = np.maximum((x - mean) / np.sqrt(variance + 1e-3) + beta, 0)
        n, h, w, f = x.shape
        x = x[:, :h // 2 * 2, :w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, f).max((2, 4))
    return x.reshape(len(x), -1) @ weights['w5'] + weights['b5']


def test_published_checkpoint_restores_by_name_and_is_what_the_model_computes_with():
    """The reference's published 5-way 1-shot model restores by name, nothing missing or left over,
    and the model's pre-update outputs are those of its weights (computed here in numpy)."""
    with tf.Graph().as_default():
        config = ModelConfig(datasource='miniimagenet', meta_batch_size=1, update_batch_size=1, update_lr=0.01,
                             num_updates=5, num_filters=32, max_pool=True)
        model = MAML(config, 84 * 84 * 3, 5, test_num_updates=1)
        model.construct_model(prefix='metatrain_')
        path = str(PUBLISHED / EXP / 'model59000')
        stored = dict(tf1.train.list_variables(path))
        ours = {v.op.name: v.shape.as_list() for v in tf1.trainable_variables()}
        assert ours == stored                          # nothing missing, nothing left over
        images = np.random.RandomState(0).uniform(0, 1, [1, 5, 84 * 84 * 3]).astype(np.float32)
        feed = {model.inputa: images, model.inputb: images, model.labela: np.eye(5)[None].astype(np.float32),
                model.labelb: np.eye(5)[None].astype(np.float32)}
        with tf1.Session() as sess:
            sess.run(tf1.global_variables_initializer())
            random_outputs = sess.run(model.outputas, feed)
            assert experiment.restore(sess, path, full_state=True) is False   # weights only, Adam fresh
            outputs = sess.run(model.outputas, feed)[0]
            weights, norm_params = sess.run([model.weights, model.norm_params])
    reader = tf1.train.load_checkpoint(path)
    np.testing.assert_array_equal(weights['w5'], reader.get_tensor('model/w5'))
    expected = conv_net_in_numpy(images[0].reshape(5, 84, 84, 3), weights, norm_params)
    np.testing.assert_allclose(outputs, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())
    assert np.abs(random_outputs[0] - expected).max() > 0.1 * np.abs(expected).max()   # the check can fail


@pytest.mark.slow
def test_short_training_through_the_max_pool_second_order_path(data_root, tmp_path, read_checkpoint):
    flags = [f for f in ONE_SHOT if not f.startswith('--meta_batch_size')] + ['--meta_batch_size=2']
    result = run_main(*flags, '--metatrain_iterations=3', '--data_root=' + str(data_root),
                      '--logdir=' + str(tmp_path))
    assert result.returncode == 0, result.stderr
    exp = tmp_path / 'cls_5.mbs_2.ubs_1.numstep5.updatelr0.01hidden32maxpoolbatchnorm'
    values = read_checkpoint(exp / 'model2')
    # The meta-optimizer (created after the pre-training one) keeps its moments in Adam_2/Adam_3.
    moments = values['model/conv1/Adam_2']
    assert np.all(np.isfinite(moments)) and np.abs(moments).max() > 0


def first_test_tasks_in_process(main_flags, data_root, logdir, count):
    """What main.py's evaluation computes for its first `count` test tasks ([count, 11]: accuracy before
    adapting and after each of 10 steps), with the graph and task stream main.py builds, in-process."""
    f = main_flags(*ONE_SHOT, '--metatrain_iterations=60000', '--train=False', '--test_set=True',
                   '--data_root=' + str(data_root), '--logdir=' + str(logdir))
    config = ModelConfig(datasource='miniimagenet', num_classes=5, meta_batch_size=1, update_batch_size=1,
                         update_lr=0.01, num_updates=5, num_filters=32, max_pool=True, pretraining=False)
    with tf.Graph().as_default():
        tf1.set_random_seed(main.TRAIN_SEED)
        model, _, _, initializers = main.build_model(f, config, main.test_num_updates_for('miniimagenet', False), 0,
                                                     60000, devices.make_placement(f))
        with tf1.Session() as sess:
            sess.run([tf1.global_variables_initializer()] + [op for op, _ in initializers],
                     {p: v for _, feed in initializers for p, v in feed.items()})
            experiment.restore(sess, str(logdir / EXP / 'model59000'), full_state=False)
            fetch = [model.metaval_total_accuracy1] + model.metaval_total_accuracies2
            return np.array([sess.run(fetch) for _ in range(count)])


@pytest.mark.slow
def test_published_checkpoint_evaluates_on_the_standin(data_root, tmp_path, main_flags):
    """main.py evaluates the published model (600 tasks): its per-task numbers are those of the
    restored weights on the same tasks, computed again in-process (random weights would differ)."""
    logdir = tmp_path / 'miniimagenet1shot'
    shutil.copytree(PUBLISHED, logdir)
    result = run_main(*ONE_SHOT, '--metatrain_iterations=60000', '--train=False', '--test_set=True',
                      '--data_root=' + str(data_root), '--logdir=' + str(logdir))
    assert result.returncode == 0, result.stderr
    assert 'Restoring model weights from ' + str(logdir / EXP / 'model59000') in result.stdout
    with open(logdir / EXP / 'test_ubs1_stepsize0.01.csv') as f:
        rows = list(csv.reader(f))
    assert rows[0] == ['update%d' % i for i in range(11)]
    with open(logdir / EXP / 'test_ubs1_stepsize0.01.pkl', 'rb') as f:
        per_task = pickle.load(f)['mses']
    assert per_task.shape == (600, 11)
    np.testing.assert_allclose(np.array(rows[1], float), per_task.mean(0), rtol=1e-5)
    np.testing.assert_allclose(per_task[:4], first_test_tasks_in_process(main_flags, data_root, logdir, 4), atol=1e-6)


def test_missing_data_names_the_preparation_command(tmp_path, main_flags):
    from experiment import UserError
    f = main_flags(*ONE_SHOT, '--data_root=' + str(tmp_path), '--logdir=' + str(tmp_path / 'logs'))
    with pytest.raises(UserError, match='miniImagenet.*prepare_miniimagenet.py'):
        main.image_tasks(f, 'train', 4, 16, main.TRAIN_SEED)
