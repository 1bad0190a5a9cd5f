"""Compares the port with outputs the reference's own code produced.

    python -m tests.golden CASE_DIR [CASE_DIR ...]

A case directory holds `case.json` (flags, test_num_updates, sizes, variables), `inputs.npz`,
`weights_init.npz`, `ckpt/` (the same weights as a reference checkpoint), `outputs.npz`,
`weights_after_3_{metatrain,pretrain}_steps.npz` and `tolerances.json`; see
`tests/golden/README.md`. Prints every quantity's largest difference as a fraction of its
tolerance and exits non-zero if any quantity misses (or is missing).
"""
import argparse
import json
import os
import sys
from contextlib import nullcontext

import numpy as np

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
import tensorflow as tf  # noqa: E402

import devices  # noqa: E402
from maml import MAML, ModelConfig  # noqa: E402

tf1 = tf.compat.v1
NUM_OPTIMIZER_STEPS = 3


def load_case(case_dir):
    with open(os.path.join(case_dir, 'case.json')) as f:
        case = json.load(f)
    npz = lambda name: dict(np.load(os.path.join(case_dir, name + '.npz')))
    return case, npz('inputs'), npz('weights_init'), npz('outputs'), {
        'after_metatrain': npz('weights_after_3_metatrain_steps'),
        'after_pretrain': npz('weights_after_3_pretrain_steps')}


def model_config(flags, moments_stop_gradient=True, fast_paths='auto'):
    """The case's flags as a ModelConfig. The golden cases were computed with TF 2.21's
    tf.nn.moments, which stops the gradient through the mean inside the variance (TF >= 1.3):
    moments_stop_gradient=True is what they pin; False is the port's default (TF 1.1/1.2's).
    fast_paths: 'auto' (fast_paths.py where it pays) or 'off' (maml.py's plain definition)."""
    fields = {f.name for f in ModelConfig.__dataclass_fields__.values()}
    return ModelConfig(moments_stop_gradient=moments_stop_gradient, fast_paths=fast_paths,
                       **{k: v for k, v in flags.items() if k in fields and v is not None})


def compute_case(case_dir, placement=None, moments_stop_gradient=True, fast_paths='auto'):
    """Runs the port on one case; returns {quantity name: value} in outputs.npz's naming.

    `placement` (devices.Placement): towers on local devices or cluster workers; default one device."""
    case, inputs, weights_init, _, _ = load_case(case_dir)
    placement = placement or devices.single_device()
    graph = tf.Graph()
    with graph.as_default(), (tf.device(placement.param_device) if placement.param_device else nullcontext()):
        model = MAML(model_config(case['flags'], moments_stop_gradient, fast_paths), case['dim_input'], case['dim_output'],
                     test_num_updates=case['test_num_updates'], towers=placement.towers,
                     param_device=placement.param_device)
        placeholders = {k: tf1.placeholder(tf.float32, [v.shape[0], None, v.shape[2]], name=k)
                        for k, v in inputs.items()}
        model.construct_model(placeholders, prefix='metatrain_')
        model.construct_model(placeholders, prefix='metaval_')
        variables = {v.op.name: v for v in tf1.trainable_variables()}
        check_variables(variables, case['variables'])
        pregrads = tf.gradients(model.total_loss1, list(variables.values()))
        feed = {placeholders[k]: v for k, v in inputs.items()}
        with placement.session() as sess:
            sess.run(tf1.global_variables_initializer())
            restore_reference_checkpoint(sess, variables, os.path.join(case_dir, 'ckpt'), weights_init)
            results = evaluate_outputs(sess, model, variables, pregrads, feed)
            for kind, op, loss in (('metatrain', model.metatrain_op, model.total_losses2[model.config.num_updates - 1]),
                                   ('pretrain', model.pretrain_op, model.total_loss1)):
                sess.run(tf1.global_variables_initializer())   # fresh Adam state
                load_weights(sess, variables, weights_init)
                losses = []
                for _ in range(NUM_OPTIMIZER_STEPS):
                    sess.run(op, feed)
                    losses.append(sess.run(loss, feed))
                results[kind + '_losses_after_each_step'] = np.array(losses)
                for name, value in sess.run(variables).items():
                    results['after_%s/%s' % (kind, name)] = value
    return results


def check_variables(variables, expected):
    got = {name: list(v.shape) for name, v in variables.items()}
    if got != expected:
        raise AssertionError('trainable variables differ from the reference:\n missing {}\n extra {}\n'
                             ' shape differs {}'.format(
                                 sorted(set(expected) - set(got)), sorted(set(got) - set(expected)),
                                 sorted(k for k in got if k in expected and got[k] != expected[k])))


def restore_reference_checkpoint(sess, variables, ckpt_dir, weights_init):
    """Restores the reference's checkpoint by name and checks it holds weights_init."""
    path = tf1.train.latest_checkpoint(ckpt_dir)
    tf1.train.Saver(variables).restore(sess, path)
    for name, value in sess.run(variables).items():
        if not np.array_equal(value, weights_init[name]):
            raise AssertionError('{}: restored value differs from weights_init.npz'.format(name))


def load_weights(sess, variables, values):
    for name, var in variables.items():
        var.load(values[name], sess)  # noqa


def evaluate_outputs(sess, model, variables, pregrads, feed):
    fetches = {'outputas': model.outputas}
    for prefix, loss1, losses2, acc1, accs2 in (
            ('metatrain', model.total_loss1, model.total_losses2, model.total_accuracy1,
             model.total_accuracies2),
            ('metaval', model.metaval_total_loss1, model.metaval_total_losses2,
             model.metaval_total_accuracy1, model.metaval_total_accuracies2)):
        fetches[prefix + '_loss_pre'] = loss1
        for j, loss in enumerate(losses2):
            fetches['%s_loss_post%d' % (prefix, j + 1)] = loss
        if model.classification:
            fetches[prefix + '_acc_pre'] = acc1
            for j, acc in enumerate(accs2):
                fetches['%s_acc_post%d' % (prefix, j + 1)] = acc
    for j, out in enumerate(model.outputbs):
        fetches['outputbs%d' % (j + 1)] = out
    names = list(variables)
    for (grad, _), name in zip(model.gvs, names):
        fetches['grad/' + name] = grad
    for grad, name in zip(pregrads, names):
        fetches['pregrad/' + name] = grad
    return sess.run(fetches, feed)


def compare(case_dir, results):
    """Returns [(quantity, difference / tolerance)], the worst first; inf for a missing quantity."""
    _, _, _, outputs, after = load_case(case_dir)
    with open(os.path.join(case_dir, 'tolerances.json')) as f:
        tolerances = json.load(f)
    expected = dict(outputs)
    for kind, weights in after.items():
        expected.update({'%s/%s' % (kind, k): v for k, v in weights.items()})
    ratios = []
    for name, tol in tolerances.items():
        if name not in results or name not in expected:
            ratios.append((name, float('inf')))
            continue
        got, want = np.asarray(results[name]), np.asarray(expected[name])
        diff = float(np.max(np.abs(got - want))) if got.shape == want.shape else float('inf')
        ratios.append((name, diff / tol if tol > 0 else (0.0 if diff == 0 else float('inf'))))
    return sorted(ratios, key=lambda r: -r[1])


def compare_with(case_dir, results, expected):
    """[(quantity, difference / the case's tolerance)], the worst first, for the quantities in
    `expected` (e.g. another reference run's outputs for the same case)."""
    with open(os.path.join(case_dir, 'tolerances.json')) as f:
        tolerances = json.load(f)
    ratios = [(name, float(np.max(np.abs(np.asarray(results[name]) - np.asarray(value)))) / tolerances[name])
              for name, value in expected.items() if name in tolerances]
    return sorted(ratios, key=lambda r: -r[1])


def check_case(case_dir, verbose=True, placement=None, save=None, fast_paths='auto'):
    results = compute_case(case_dir, placement, fast_paths=fast_paths)
    if save:
        np.savez(save, **results)
    ratios = compare(case_dir, results)
    misses = [(n, r) for n, r in ratios if not r <= 1.0]
    if verbose:
        print('== {}: {} quantities, worst {:.3f} of tolerance, {} miss'.format(
            os.path.basename(os.path.normpath(case_dir)), len(ratios), ratios[0][1], len(misses)))
        for name, ratio in sorted(ratios):
            print('  {:<45s} {:8.3f}{}'.format(name, ratio, '  MISS' if not ratio <= 1.0 else ''))
    return misses


def main(argv):
    parser = argparse.ArgumentParser(prog='python -m tests.golden', description=__doc__.strip().splitlines()[0])
    parser.add_argument('cases', nargs='*')
    parser.add_argument('--devices', default='', help='towers on these local devices, as main.py --devices')
    parser.add_argument('--cluster', default='', help='towers on these workers, as main.py --cluster')
    parser.add_argument('--save', default='', help='with one case: write the computed quantities to this .npz')
    parser.add_argument('--fast_paths', default='auto', choices=('auto', 'off'), help='as main.py --fast_paths')
    args = parser.parse_args(argv)
    if not args.cases:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    placement = (devices.cluster_placement(args.cluster) if args.cluster else
                 devices.local_placement(args.devices) if args.devices else None)
    failed = [d for d in args.cases if check_case(d, placement=placement, save=args.save or None,
                                                  fast_paths=args.fast_paths)]
    print('golden: {} of {} cases match'.format(len(args.cases) - len(failed), len(args.cases)))
    return 1 if failed else 0

