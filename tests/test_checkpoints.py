"""Checkpoints: relaunch, reference checkpoints, --test_iter, the variables saved (resuming after faults:
test_faults.py; the published MiniImagenet model: test_miniimagenet.py)."""
import dataclasses
import shutil

import numpy as np
import pytest
import tensorflow as tf

import experiment
from maml import MAML, ModelConfig
from tests.cli import run_main
from tests.conftest import GOLDEN, SINUSOID_FLAGS, SINUSOID_ITERATIONS
from experiment import UserError

tf1 = tf.compat.v1
FLAGS = ['--datasource=sinusoid', '--norm=None', '--update_batch_size=10', '--update_lr=0.01']
EXP = 'cls_5.mbs_25.ubs_10.numstep1.updatelr0.01nonorm'


def checkpoints_in(folder):
    return sorted(p.name[:-len('.index')] for p in folder.glob('model*.index'))


def test_relaunching_a_finished_run_trains_nothing(copy_of_sinusoid_run, run_in_process, capsys):
    logdir, exp, _ = copy_of_sinusoid_run
    before = sorted(p.name for p in exp.iterdir())
    assert not list(exp.glob('*.meta'))     # checkpoints hold weights and optimizer state only
    run_in_process(*SINUSOID_FLAGS, '--metatrain_iterations=%d' % SINUSOID_ITERATIONS, '--logdir=' + str(logdir))
    assert 'Training already finished: {} holds iteration 2099 of 2100; nothing to do.'.format(
        exp / 'model2099') in capsys.readouterr().out
    assert sorted(p.name for p in exp.iterdir()) == before


def test_test_iter_evaluates_the_named_checkpoint(copy_of_sinusoid_run):
    logdir, exp, _ = copy_of_sinusoid_run
    command = SINUSOID_FLAGS + ['--metatrain_iterations=%d' % SINUSOID_ITERATIONS, '--logdir=' + str(logdir)]
    result = run_main(*command, '--train=False', '--test_iter=1000')
    assert result.returncode == 0, result.stderr
    assert 'Restoring model weights from ' + str(exp / 'model1000') in result.stdout
    assert (exp / 'test_ubs5_stepsize0.001.csv').is_file()
    # A missing one is a clear error naming the ones there are.
    with pytest.raises(UserError) as raised:
        experiment.evaluation_checkpoint(str(exp), test_iter=1234)
    assert all(n in str(raised.value) for n in ('model1234', '1000', '2000', '2099')), raised.value


def test_reference_checkpoint_resumes_training_with_fresh_optimizer(tmp_path, read_checkpoint):
    logdir = tmp_path / 'sine'
    shutil.copytree(GOLDEN / 'sinusoid_trained', logdir, ignore=shutil.ignore_patterns('expected'))
    result = run_main(*FLAGS, '--metatrain_iterations=5003', '--logdir=' + str(logdir))
    assert result.returncode == 0, result.stderr
    assert 'optimizer state starts fresh' in result.stdout
    new = read_checkpoint(logdir / EXP / 'model5002')
    old = read_checkpoint(logdir / EXP / 'model4999')
    assert set(old) < set(new)                                  # now with Adam's state
    assert 0 < np.abs(new['model/Variable_2'] - old['model/Variable_2']).max() < 0.01


def saved_variables(config, dim_input, dim_output):
    """{name: shape} of the variables a checkpoint holds, and {(first, second moment)} the meta-update reads."""
    with tf.Graph().as_default():
        model = MAML(config, dim_input, dim_output, test_num_updates=1)
        model.construct_model(prefix='metatrain_')
        return ({v.op.name: v.shape.as_list() for v in tf1.global_variables()},
                {(op.inputs[1].op.name.split('/')[-1], op.inputs[2].op.name.split('/')[-1])
                 for op in ancestors(model.metatrain_op) if op.type == 'ResourceApplyAdam'})


def ancestors(op):
    seen, stack = set(), [op]
    while stack:
        op = stack.pop()
        if op not in seen:
            seen.add(op)
            stack.extend(list(op.control_inputs) + [t.op for t in op.inputs])
    return seen


def test_checkpoints_hold_the_same_variables_with_or_without_pretraining():
    """Without --pretrain_iterations the pre-training op's gradient is not built, but its Adam moments
    are: a checkpoint resumes whatever the flags, and has the names it had (the meta-optimizer's
    moments in Adam_2 and Adam_3)."""
    configs = [(ModelConfig(datasource='sinusoid', norm='None', meta_batch_size=4), 1, 1),
               (ModelConfig(datasource='omniglot', num_classes=5, meta_batch_size=2, update_batch_size=1,
                            num_filters=8), 28 * 28, 5),
               (ModelConfig(datasource='omniglot', num_classes=5, meta_batch_size=2, update_batch_size=1,
                            num_filters=8, moments_stop_gradient=True), 28 * 28, 5),
               (ModelConfig(datasource='omniglot', num_classes=5, meta_batch_size=2, update_batch_size=1,
                            norm='layer_norm', conv=False), 28 * 28, 5),
               (ModelConfig(datasource='miniimagenet', meta_batch_size=2, update_batch_size=1, num_filters=8,
                            max_pool=True), 84 * 84 * 3, 5)]
    for config, dim_input, dim_output in configs:
        with_pretraining, meta_moments = saved_variables(config, dim_input, dim_output)
        without, meta_moments_without = saved_variables(dataclasses.replace(config, pretraining=False), dim_input,
                                                        dim_output)
        assert without == with_pretraining, config.datasource
        assert meta_moments == meta_moments_without == {('Adam_2', 'Adam_3')}, config.datasource
        weights = [name for name in without if '/Adam' not in name and not name.startswith('beta')]
        slots = {w + suffix for w in weights for suffix in ('/Adam', '/Adam_1', '/Adam_2', '/Adam_3')}
        assert set(without) == set(weights) | slots | {'beta1_power', 'beta2_power', 'beta1_power_1', 'beta2_power_1'}
