"""Makes a golden case's expected numbers anew with the reference's own code.

    MAML_REFERENCE_DIR=DIR python tests/golden/make_cases.py CASE_DIR [...] [--out DIR]
    MAML_REFERENCE_DIR=DIR $MAML_REFERENCE_VENV/bin/python tests/golden/make_cases.py CASE_DIR --out DIR
    MAML_REFERENCE_DIR=DIR python tests/golden/make_cases.py --tolerances CASE_DIR [...]

For each case folder it reads `case.json` (the flags), `inputs.npz` and `ckpt/` (the initial weights,
as the reference's Saver wrote them), builds the reference's MAML (cbfinn/maml at a7f45f1, imported
unchanged from $MAML_REFERENCE_DIR) with those flags, and writes `outputs.npz`,
`weights_after_3_metatrain_steps.npz` and `weights_after_3_pretrain_steps.npz` into --out (default: the
case folder itself). The reference runs as it shipped but for batch norm, computed from the batch
moments (bench/contrib_moments.py, as `bench/reference.py --moments` runs it) rather than the fused
kernel, whose second derivative inside tf.map_fn is wrong.

It runs under whatever TensorFlow the interpreter has:
- TensorFlow 2 (this project's venv; how the stored files were made): the reference's
  `import tensorflow` gets `tf.compat.v1`, and its two other contrib calls get equivalents (Xavier
  initialisation = glorot_uniform; accuracy = mean of equal arg maxes).
- TensorFlow 1.15 (the reference's venv, `python bench/reference.py --build_venv`): contrib as shipped.
  See README.md for how its numbers compare with the stored ones.

--tolerances (TensorFlow 2): runs every case twice in subprocesses, oneDNN off and on (the same math,
rounded differently), writes the oneDNN-off outputs and `tolerances.json` from the two (README.md has
the rule).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
OPTIMIZER_STEPS = 3


## The reference, importable here
def import_reference(flags):
    """The reference's maml module, from a copy whose batch norm is computed from moments
    (bench/reference.py --moments), its flags parsed from `flags` (the case's)."""
    sys.path.insert(0, str(REPO / 'bench'))
    import reference
    work = reference.working_copy(moments=True)
    import tensorflow as tf
    if not tf.__version__.startswith('1.'):
        install_tf1_shim(tf)
    sys.path.insert(0, str(work))
    sys.argv = ['main.py'] + ['--{}={}'.format(k, v) for k, v in flags.items() if v is not None]
    import main  # noqa: F401  (defines the reference's flags)
    import maml
    from tensorflow.python.platform import flags as tf_flags
    tf_flags.FLAGS(sys.argv, known_only=True)
    return maml


def install_tf1_shim(tf):
    """`import tensorflow` gives tf.compat.v1, with the two tf.contrib calls left in the reference."""
    v1 = tf.compat.v1
    v1.disable_v2_behavior()
    glorot = lambda dtype=tf.float32, **_: v1.glorot_uniform_initializer(dtype=dtype)
    accuracy = lambda predictions, labels: v1.reduce_mean(v1.cast(v1.equal(predictions, labels), v1.float32))
    v1.contrib = types.SimpleNamespace(
        layers=types.SimpleNamespace(xavier_initializer=glorot, xavier_initializer_conv2d=glorot),
        metrics=types.SimpleNamespace(accuracy=accuracy))
    sys.modules['tensorflow'] = v1


## One case
def make_case(case_dir):
    """{quantity: value} for one case, in outputs.npz's naming plus after_metatrain/VAR, after_pretrain/VAR."""
    case = json.loads((case_dir / 'case.json').read_text())
    inputs = dict(np.load(case_dir / 'inputs.npz'))
    maml = import_reference(case['flags'])
    import tensorflow as tf   # TF 1.15, or the shim's tf.compat.v1
    model = maml.MAML(case['dim_input'], case['dim_output'], test_num_updates=case['test_num_updates'])
    placeholders = {k: tf.placeholder(tf.float32, v.shape, name=k) for k, v in inputs.items()}
    model.construct_model(input_tensors=placeholders, prefix='metatrain_')
    model.construct_model(input_tensors=placeholders, prefix='metaval_')
    variables = {v.op.name: v for v in tf.get_collection(tf.GraphKeys.TRAINABLE_VARIABLES)}
    pregrads = tf.gradients(model.total_loss1, list(variables.values()))
    feed = {placeholders[k]: v for k, v in inputs.items()}
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        checkpoint = tf.train.latest_checkpoint(str(case_dir / 'ckpt'))
        tf.train.Saver(variables).restore(sess, checkpoint)
        initial = sess.run(variables)
        results = sess.run(fetches(model, variables, pregrads), feed)
        for kind, op, loss in (('metatrain', model.metatrain_op, model.total_losses2[model_num_updates(case) - 1]),
                               ('pretrain', model.pretrain_op, model.total_loss1)):
            sess.run(tf.global_variables_initializer())   # fresh Adam state
            for name, variable in variables.items():
                variable.load(initial[name], sess)
            losses = []
            for _ in range(OPTIMIZER_STEPS):
                sess.run(op, feed)
                losses.append(sess.run(loss, feed))
            results[kind + '_losses_after_each_step'] = np.array(losses)
            results.update({'after_{}/{}'.format(kind, name): value for name, value in sess.run(variables).items()})
    return results


def model_num_updates(case):
    return case['flags'].get('num_updates') or 1


def fetches(model, variables, pregrads):
    wanted = {'outputas': model.outputas}
    for prefix in ('metatrain', 'metaval'):
        own = '' if prefix == 'metatrain' else 'metaval_'
        wanted[prefix + '_loss_pre'] = getattr(model, own + 'total_loss1')
        for j, loss in enumerate(getattr(model, own + 'total_losses2')):
            wanted['{}_loss_post{}'.format(prefix, j + 1)] = loss
        if hasattr(model, own + 'total_accuracy1'):
            wanted[prefix + '_acc_pre'] = getattr(model, own + 'total_accuracy1')
            for j, accuracy in enumerate(getattr(model, own + 'total_accuracies2')):
                wanted['{}_acc_post{}'.format(prefix, j + 1)] = accuracy
    for j, output in enumerate(model.outputbs):
        wanted['outputbs{}'.format(j + 1)] = output
    gradients = {v.op.name: g for g, v in model.gvs}
    wanted.update({'grad/' + name: gradients[name] for name in variables})
    wanted.update({'pregrad/' + name: g for name, g in zip(variables, pregrads)})
    return wanted


def write_case(results, out):
    out.mkdir(parents=True, exist_ok=True)
    after = {kind: {k.split('/', 1)[1]: v for k, v in results.items() if k.startswith('after_' + kind + '/')}
             for kind in ('metatrain', 'pretrain')}
    np.savez(out / 'outputs.npz', **{k: v for k, v in results.items() if not k.startswith('after_')})
    np.savez(out / 'weights_after_3_metatrain_steps.npz', **after['metatrain'])
    np.savez(out / 'weights_after_3_pretrain_steps.npz', **after['pretrain'])


## Tolerances
VALUE_FLOOR, GRADIENT_FLOOR, ROUNDING_MARGIN = 1e-4, 5e-3, 10.0


def tolerances(case, a, b):
    """{quantity: the largest absolute difference allowed} from two runs differing only in rounding."""
    flags = case['flags']
    query = flags['num_classes'] * flags['update_batch_size'] if flags['datasource'] != 'sinusoid' else None
    gradient_scale = {kind: max(float(np.max(np.abs(v))) for k, v in a.items() if k.startswith(kind + '/'))
                      for kind in ('grad', 'pregrad')}
    # Gradients that are rounding noise: those of the biases that feed batch norm (the pre-update
    # gradient always; the meta-gradient too, but for TF >= 1.3's moments).
    noise = {k for k, v in a.items() if k.split('/')[0] in gradient_scale
             and np.max(np.abs(v)) < 1e-4 * gradient_scale[k.split('/')[0]]}
    cancelled = {k.split('/', 1)[1] for k in noise if k.startswith('pregrad/')}
    result = {}
    for name, value in a.items():
        kind, _, variable = name.partition('/')
        if kind.startswith('after_') and variable in cancelled:
            continue   # Adam turns rounding noise into full steps
        rounding = ROUNDING_MARGIN * float(np.max(np.abs(np.asarray(value) - np.asarray(b[name]))))
        if kind in ('grad', 'pregrad'):
            floor = GRADIENT_FLOOR * (gradient_scale[kind] if name in noise else float(np.max(np.abs(value))))
        else:
            floor = VALUE_FLOOR * float(np.max(np.abs(value)))
        if '_acc_' in name:   # one flipped prediction of one task
            floor = max(floor, 1.01 / (flags['meta_batch_size'] * query))
        result[name] = max(floor, rounding)
    return result


def make_with_tolerances(case_dirs, out_root):
    """Runs every case with oneDNN off and on; writes the off run and tolerances.json."""
    for case_dir in case_dirs:
        runs = []
        for onednn in ('0', '1'):
            with tempfile.TemporaryDirectory() as tmp:
                env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=onednn, TF_CPP_MIN_LOG_LEVEL='3')
                subprocess.run([sys.executable, __file__, str(case_dir), '--out', tmp], env=env, check=True)
                runs.append(load_results(Path(tmp)))
        out = out_root / case_dir.name if out_root else case_dir
        write_case(runs[0], out)
        case = json.loads((case_dir / 'case.json').read_text())
        (out / 'tolerances.json').write_text(json.dumps(tolerances(case, *runs), indent=1, sort_keys=True))
        print('wrote {} with tolerances'.format(out))


def load_results(folder):
    results = dict(np.load(folder / 'outputs.npz'))
    for kind in ('metatrain', 'pretrain'):
        weights = np.load(folder / 'weights_after_3_{}_steps.npz'.format(kind))
        results.update({'after_{}/{}'.format(kind, k): v for k, v in weights.items()})
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('cases', nargs='+', type=Path)
    parser.add_argument('--out', type=Path, default=None, help='write here (one case) or under here (several)')
    parser.add_argument('--tolerances', action='store_true', help='also tolerances.json, from oneDNN off and on')
    args = parser.parse_args()
    if args.tolerances:
        make_with_tolerances(args.cases, args.out)
        return
    if len(args.cases) > 1:   # the reference's flags and graph are per process
        for case_dir in args.cases:
            out = args.out / case_dir.name if args.out else case_dir
            subprocess.run([sys.executable, __file__, str(case_dir), '--out', str(out)], check=True)
        return
    case_dir = args.cases[0]
    write_case(make_case(case_dir), args.out or case_dir)
    print('wrote {}'.format(args.out or case_dir))


if __name__ == '__main__':
    main()
