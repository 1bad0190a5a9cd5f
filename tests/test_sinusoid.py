"""Sinusoid: the reference's evaluation protocol end to end, and meta-learning that works."""
import csv
import pickle
import shutil

import numpy as np
import tensorflow as tf

from tests.conftest import GOLDEN
from data_generator import SinusoidTasks, batch_rng, split_support_query
from maml import MAML, ModelConfig
from tests.cli import run_main

tf1 = tf.compat.v1
TRAINED = GOLDEN / 'sinusoid_trained'
EXP = 'cls_5.mbs_25.ubs_10.numstep1.updatelr0.01nonorm'
PAPER_FLAGS = ['--datasource=sinusoid', '--metatrain_iterations=5000', '--norm=None',
               '--update_batch_size=10', '--update_lr=0.01']


def read_csv(path):
    with open(path) as f:
        rows = list(csv.reader(f))
    return rows[0], np.array(rows[1:], dtype=np.float64)


def test_evaluation_of_reference_checkpoint_reproduces_its_csv(tmp_path):
    logdir = tmp_path / 'sine'
    shutil.copytree(TRAINED, logdir, ignore=shutil.ignore_patterns('expected'))
    result = run_main(*PAPER_FLAGS, '--train=False', '--logdir=' + str(logdir))
    assert result.returncode == 0, result.stderr
    header, got = read_csv(logdir / EXP / 'test_ubs10_stepsize0.01.csv')
    want_header, want = read_csv(TRAINED / 'expected' / 'test_ubs10_stepsize0.01.csv')
    assert header == want_header == ['update%d' % i for i in range(11)]
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)
    with open(logdir / EXP / 'test_ubs10_stepsize0.01.pkl', 'rb') as f:
        mses = pickle.load(f)['mses']
    assert mses.shape == (600, 11)
    np.testing.assert_allclose(mses.mean(0), want[0], rtol=2e-6)


def test_short_meta_training_learns_to_adapt():
    """After 1500 meta-updates one inner step must cut the query loss well below the pre-update loss."""
    config = ModelConfig(datasource='sinusoid', norm='None', update_batch_size=10, update_lr=0.01)
    tasks = SinusoidTasks(2 * config.update_batch_size, config.meta_batch_size)
    with tf.Graph().as_default():
        tf1.set_random_seed(0)
        model = MAML(config, 1, 1, test_num_updates=5)
        model.construct_model(prefix='metatrain_')

        def feed(rng):
            batch = split_support_query(*tasks.generate(rng)[:2], config.update_batch_size)
            return {getattr(model, k): v for k, v in batch.items()}

        with tf1.Session() as sess:
            sess.run(tf1.global_variables_initializer())
            fetch = [model.total_loss1, model.total_losses2[0]]
            before = np.mean([sess.run(fetch, feed(batch_rng(99, i))) for i in range(20)], 0)
            for itr in range(1500):
                sess.run(model.metatrain_op, feed(batch_rng(0, itr)))
            after = np.mean([sess.run(fetch, feed(batch_rng(99, i))) for i in range(20)], 0)
    pre, post = after
    assert post < 0.6 * pre, (before, after)          # adaptation helps...
    assert post < 0.6 * before[1], (before, after)    # ...and meta-training improved it


def test_oracle_baseline_pretrains_through_main(tmp_path):
    """The oracle (amplitude and phase as inputs) trains by the pre-training op alone: the graph built
    for --pretrain_iterations has it, and its pre-update loss falls (measured: 2.57 at iteration 1000,
    0.37 at 3000)."""
    result = run_main('--datasource=sinusoid', '--baseline=oracle', '--pretrain_iterations=3001',
                      '--metatrain_iterations=0', '--norm=None', '--update_batch_size=10',
                      '--logdir=' + str(tmp_path))
    assert result.returncode == 0, result.stderr
    losses = [float(line.split()[3].rstrip(',')) for line in result.stdout.splitlines()
              if line.startswith('Pretrain Iteration')]
    assert len(losses) == 3, result.stdout
    assert losses[-1] < 0.3 * losses[0], losses
