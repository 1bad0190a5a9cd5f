"""The port against the reference's own outputs (../shared/golden/cases)."""
import os
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


@pytest.mark.parametrize('case', CASES)
def test_case_matches_reference_within_tolerance(case):
    assert golden.check_case(str(GOLDEN / 'cases' / case)) == []


def test_without_onednn_the_per_task_convolution_fallback_matches_too():
    """CPU TensorFlow without oneDNN has no grouped convolution: each task gets its own convolution."""
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS='0')
    script = ('import utils, sys; from tests import golden; assert not utils.grouped_conv_supported(); '
              'sys.exit(golden.main(sys.argv[1:]))')
    result = subprocess.run([sys.executable, '-c', script, str(GOLDEN / 'cases' / 'omniglot_5w1s')],
                            cwd=str(REPO), env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'golden: 1 of 1 cases match' in result.stdout


def test_checker_command_fails_on_a_perturbed_case(tmp_path):
    case = tmp_path / 'sine_perturbed'
    shutil.copytree(GOLDEN / 'cases' / 'sine_k10_2steps', case)
    outputs = dict(np.load(case / 'outputs.npz'))
    outputs['outputbs2'] = outputs['outputbs2'] + 1e-3      # far above its tolerance
    np.savez(case / 'outputs.npz', **outputs)
    assert golden.main([str(case)]) == 1
    assert golden.main([str(GOLDEN / 'cases' / 'sine_oracle_pretrain')]) == 0
