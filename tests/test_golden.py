"""The port against the reference's own outputs (tests/golden/cases; how they were made: tests/golden/README.md)."""
import json
import os
import platform
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import GOLDEN, REPO
from tests import golden

CASES = sorted(p.name for p in (GOLDEN / 'cases').iterdir() if (p / 'case.json').is_file())


def test_all_four_cases_are_present():
    assert {'sine_k10_2steps', 'sine_oracle_pretrain', 'omniglot_5w1s', 'omniglot_5w1s_firstorder'} <= set(CASES)


@pytest.mark.parametrize('case, fast_paths', [
    pytest.param(case, path, marks=[pytest.mark.slow] if path == 'off' and case.startswith('omniglot') else [])
    for case in CASES for path in ('auto', 'off')])
def test_case_matches_reference_within_tolerance(case, fast_paths, golden_results):
    """With the fast paths (auto) and with the plain definition (off)."""
    ratios = golden.compare(str(GOLDEN / 'cases' / case), golden_results(case, fast_paths))
    assert len(ratios) >= 38 and [(n, r) for n, r in ratios if not r <= 1.0] == []


def run_without_onednn(script, *args):
    """Runs `script` (Python) in a process with oneDNN off: CPU TensorFlow then has no grouped
    convolution (each task gets its own) and the model takes its fallbacks."""
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS='0', TF_CPP_MIN_LOG_LEVEL='3')
    result = subprocess.run([sys.executable, '-c', 'import fast_paths; assert not fast_paths.Capabilities.of().grouped_conv\n' + script,
                             *args], cwd=str(REPO), env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


GOLDEN_MAIN = 'import sys; from tests import golden; sys.exit(golden.main(sys.argv[1:]))'


def test_without_onednn_the_first_order_case_matches():
    out = run_without_onednn(GOLDEN_MAIN, str(GOLDEN / 'cases' / 'omniglot_5w1s_firstorder'))
    assert 'golden: 1 of 1 cases match' in out


@pytest.mark.slow
def test_without_onednn_every_case_matches():
    out = run_without_onednn(GOLDEN_MAIN, *[str(GOLDEN / 'cases' / c) for c in CASES])
    assert 'golden: {0} of {0} cases match'.format(len(CASES)) in out


def test_tensorflow_runs_here_as_main_sets_it_for_image_data():
    """conftest loads TensorFlow with oneDNN as main.py sets it for image data, so the in-process
    tests run the paths main.py runs on this CPU (TensorFlow itself leaves oneDNN off on x86 CPUs
    without AVX-512 VNNI)."""
    import fast_paths
    import main
    if 'TF_ENABLE_ONEDNN_OPTS' in os.environ:
        pytest.skip('TF_ENABLE_ONEDNN_OPTS={} is set for this run'.format(os.environ['TF_ENABLE_ONEDNN_OPTS']))
    wanted = main.onednn_default(['--datasource=omniglot'], platform.machine(), as_script=True)
    if wanted is None:
        pytest.skip('main.py leaves oneDNN to TensorFlow on {}'.format(platform.machine()))
    can = fast_paths.Capabilities.of()
    assert can.grouped_conv == can.fused_bn_grad == (wanted == '1')


TF12_SCRIPT = '\n'.join([
    'import json, sys, numpy as np',
    'from tests import golden',
    'case, tf12 = sys.argv[1], dict(np.load(sys.argv[2]))',
    'tf12.pop("tf_version")',
    'results = golden.compute_case(case, moments_stop_gradient=False)',
    'print(json.dumps({"default": golden.compare_with(case, results, tf12),',
    '                  "golden_outputs": golden.compare_with(case, dict(np.load(case + "/outputs.npz")), tf12)}))'])
TF12_ARGS = (str(GOLDEN / 'cases' / 'omniglot_5w1s'), str(REPO / 'tests' / 'reference_tf12' / 'omniglot_5w1s.npz'))


def assert_tf12_meta_gradient(ratios):
    """The golden cases pin the meta-gradient of TF >= 1.3's tf.nn.moments (--moments_stop_gradient);
    the port's default is that of TF 1.1/1.2, which the reference's own code computes there
    (tests/reference_tf12/make_outputs.py). Same tolerances; they tell the two apart."""
    assert len(ratios['default']) == 18 and ratios['default'][0][1] <= 1.0, ratios['default'][:3]
    # The golden outputs (TF >= 1.3's moments) miss TF 1.2's meta-gradient: the conv biases by 200
    # times their tolerance (TF 1.2 gives them none), 11 of the 14 gradients in all.
    misses = {name for name, ratio in ratios['golden_outputs'] if ratio > 30}
    assert {'grad/model/Variable', 'grad/model/conv1', 'grad/model/0/beta'} <= misses and len(misses) == 11


def test_default_moments_give_the_meta_gradient_of_the_reference_on_tf12():
    case, tf12_file = TF12_ARGS
    tf12 = dict(np.load(tf12_file))
    tf12.pop('tf_version')
    results = golden.compute_case(case, moments_stop_gradient=False)
    assert_tf12_meta_gradient({'default': golden.compare_with(case, results, tf12),
                               'golden_outputs': golden.compare_with(case, dict(np.load(case + '/outputs.npz')), tf12)})


@pytest.mark.slow
def test_default_moments_give_the_meta_gradient_of_the_reference_on_tf12_without_onednn():
    out = run_without_onednn(TF12_SCRIPT, *TF12_ARGS)
    assert_tf12_meta_gradient(json.loads(out.strip().splitlines()[-1]))


def test_main_turns_onednn_on_for_image_data_only():
    import main
    assert main._runs_convolutions(['--datasource=omniglot', '--num_classes=20'])
    assert main._runs_convolutions(['--logdir=x', '--datasource', 'miniimagenet'])
    assert not main._runs_convolutions(['--datasource=sinusoid', '--norm=None'])
    assert not main._runs_convolutions(['--norm=None'])      # the default data source is the sinusoid


def test_main_turns_onednn_off_for_the_sinusoid_in_its_own_process_only():
    import main
    assert main.onednn_default(['--datasource=omniglot'], 'x86_64', as_script=False) == '1'
    assert main.onednn_default(['--job_name=worker', '--cluster=h:1'], 'x86_64', as_script=True) == '1'
    assert main.onednn_default(['--datasource=sinusoid'], 'x86_64', as_script=True) == '0'
    assert main.onednn_default([], 'AMD64', as_script=True) == '0'
    assert main.onednn_default(['--datasource=sinusoid'], 'x86_64', as_script=False) is None   # imported by a test
    assert main.onednn_default(['--datasource=omniglot'], 'aarch64', as_script=True) is None
    if platform.machine().lower() not in ('x86_64', 'amd64'):
        pytest.skip('main.py changes oneDNN only on x86')
    # And main.py applies it before TensorFlow loads (TF logs at import whether oneDNN is on).
    env = {k: v for k, v in os.environ.items() if k != 'TF_ENABLE_ONEDNN_OPTS'}
    env['TF_CPP_MIN_LOG_LEVEL'] = '0'
    for datasource, on in (('sinusoid', False), ('omniglot', True)):
        result = subprocess.run([sys.executable, str(REPO / 'main.py'), '--datasource=' + datasource,
                                 '--metatrain_iterations=0', '--logdir=/nonexistent'],   # stops right after the import
                                env=env, capture_output=True, text=True, timeout=300)
        assert ('oneDNN custom operations are on' in result.stderr) == on, (datasource, result.stderr[-2000:])


def test_checker_command_fails_on_a_perturbed_case(tmp_path):
    case = tmp_path / 'sine_perturbed'
    shutil.copytree(GOLDEN / 'cases' / 'sine_k10_2steps', case)
    outputs = dict(np.load(case / 'outputs.npz'))
    outputs['outputbs2'] = outputs['outputbs2'] + 1e-3      # far above its tolerance
    np.savez(case / 'outputs.npz', **outputs)
    assert golden.main([str(case)]) == 1
    assert golden.main([str(GOLDEN / 'cases' / 'sine_oracle_pretrain')]) == 0
