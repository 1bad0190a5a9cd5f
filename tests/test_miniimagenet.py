"""MiniImagenet end to end on a generated stand-in (the real images cannot be redistributed)."""
import csv
import shutil

import numpy as np
import pytest
import tensorflow as tf

from data_generator import load_image_dataset, miniimagenet_class_folders
from tests.cli import assert_one_line_error, run_main
from tests.conftest import GOLDEN
from tests.standin import make_miniimagenet_prepared

tf1 = tf.compat.v1
ONE_SHOT = ['--datasource=miniimagenet', '--meta_batch_size=4', '--update_batch_size=1', '--update_lr=0.01',
            '--num_updates=5', '--num_classes=5', '--num_filters=32', '--max_pool=True']
EXP = 'cls_5.mbs_4.ubs_1.numstep5.updatelr0.01hidden32maxpoolbatchnorm'


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    make_miniimagenet_prepared(root / 'miniImagenet', classes=(6, 5, 5), images_per_class=20)
    return root


def test_loader_reads_rgb_84x84_scaled_not_inverted(data_root):
    folders = miniimagenet_class_folders(str(data_root / 'miniImagenet'), 'train')
    dataset = load_image_dataset('miniimagenet', folders, 84, 3)
    assert dataset.pixels.shape == (6, 20, 84 * 84 * 3)
    assert dataset.pixels.dtype == np.uint8 and dataset.pixels.max() > 200


def test_short_training_through_the_max_pool_second_order_path(data_root, tmp_path):
    flags = [f for f in ONE_SHOT if not f.startswith('--meta_batch_size')] + ['--meta_batch_size=2']
    result = run_main(*flags, '--metatrain_iterations=3', '--data_root=' + str(data_root),
                      '--logdir=' + str(tmp_path))
    assert result.returncode == 0, result.stderr
    exp = tmp_path / 'cls_5.mbs_2.ubs_1.numstep5.updatelr0.01hidden32maxpoolbatchnorm'
    reader = tf1.train.load_checkpoint(str(exp / 'model2'))
    # The meta-optimizer (created after the pre-training one) keeps its moments in Adam_2/Adam_3.
    moments = reader.get_tensor('model/conv1/Adam_2')
    assert np.all(np.isfinite(moments)) and np.abs(moments).max() > 0


def test_published_checkpoint_evaluates_on_the_standin(data_root, tmp_path):
    logdir = tmp_path / 'miniimagenet1shot'
    shutil.copytree(GOLDEN / 'reference_checkpoints' / 'miniimagenet1shot', logdir)
    result = run_main(*ONE_SHOT, '--metatrain_iterations=60000', '--train=False', '--test_set=True',
                      '--data_root=' + str(data_root), '--logdir=' + str(logdir))
    assert result.returncode == 0, result.stderr
    assert 'Restoring model weights from ' + str(logdir / EXP / 'model59000') in result.stdout
    with open(logdir / EXP / 'test_ubs1_stepsize0.01.csv') as f:
        rows = list(csv.reader(f))
    assert rows[0] == ['update%d' % i for i in range(11)]
    values = np.array(rows[1:], dtype=float)
    assert np.all(np.isfinite(values)) and np.all((values[0] >= 0) & (values[0] <= 1))


def test_missing_data_names_the_preparation_command(tmp_path):
    result = run_main(*ONE_SHOT, '--data_root=' + str(tmp_path), '--logdir=' + str(tmp_path / 'logs'))
    assert_one_line_error(result, 'miniImagenet', 'prepare_miniimagenet.py')
