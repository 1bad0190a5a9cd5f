"""The port against the reference's own outputs (../shared/golden/cases)."""
import shutil

import numpy as np
import pytest

from tests.conftest import GOLDEN
from tests import golden

CASES = sorted(p.name for p in (GOLDEN / 'cases').iterdir() if (p / 'case.json').is_file())


def test_all_four_cases_are_present():
    assert {'sine_k10_2steps', 'sine_oracle_pretrain', 'omniglot_5w1s', 'omniglot_5w1s_firstorder'} <= set(CASES)


@pytest.mark.parametrize('case', CASES)
def test_case_matches_reference_within_tolerance(case):
    assert golden.check_case(str(GOLDEN / 'cases' / case)) == []


def test_checker_command_fails_on_a_perturbed_case(tmp_path):
    case = tmp_path / 'sine_perturbed'
    shutil.copytree(GOLDEN / 'cases' / 'sine_k10_2steps', case)
    outputs = dict(np.load(case / 'outputs.npz'))
    outputs['outputbs2'] = outputs['outputbs2'] + 1e-3      # far above its tolerance
    np.savez(case / 'outputs.npz', **outputs)
    assert golden.main([str(case)]) == 1
    assert golden.main([str(GOLDEN / 'cases' / 'sine_oracle_pretrain')]) == 0
