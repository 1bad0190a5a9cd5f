"""Which form of the fast paths pays on this CPU: main.py with each speed-up switched off in turn.

    python bench/bench_forms.py [omniglot20 omniglot5 ...] [--forms auto,no_patches,...] [--rounds 2]
        [--iterations N] [--data_root DIR]
    ONEDNN_MAX_CPU_ISA=AVX2 python bench/bench_forms.py omniglot20     # oneDNN held to AVX2 (any x86 CPU)

Forms: `auto` (what fast_paths.Capabilities chooses here), `no_patches` (the first layer's batch norm
by the grouped convolution, not from its input's patches), `per_task_convs` (one convolution per task,
no grouped ones), `no_fused_bn` (batch norm's derivatives by autodiff, sums unblocked), `one_tower`
(--cpu_towers=1: one tower, TensorFlow's threads) and `off` (--fast_paths=off: the plain definition).
A form switches capabilities off by patching fast_paths.Capabilities.of in main.py's process; nothing
of it is a flag of main.py. Each round runs every form once, the order turned around every round;
prints the medians (ms per meta-iteration between the first and the last progress line, as
bench_side_by_side.py measures) and each form's ratio to auto. Nothing else heavy may run meanwhile.
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_side_by_side import MEASURED, flags_of, timed_run  # noqa: E402
from bench_train import REPO, prepare_data  # noqa: E402

FORMS = {   # form: (capabilities switched off, extra main.py flags)
    'auto': ({}, []),
    'no_patches': ({'first_layer_from_patches': False}, []),
    'per_task_convs': ({'grouped_conv': False, 'first_layer_from_patches': False}, []),
    'no_fused_bn': ({'fused_bn_grad': False, 'blocked_sums': False, 'first_layer_from_patches': False}, []),
    'one_tower': ({}, ['--cpu_towers=1']),
    'off': ({}, ['--fast_paths=off']),
}
# main.py in this process, with some of fast_paths.Capabilities.of's answers switched off.
WRAPPER = """import os, runpy, sys
sys.path.insert(0, {repo!r})
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '1')   # as main.py sets it for image data, before TF loads
import fast_paths
real = fast_paths.Capabilities.of
def of(device=None):
    capabilities = real(device)
    vars(capabilities).update({changes!r})
    return capabilities
fast_paths.Capabilities.of = of
sys.argv = ['main.py'] + sys.argv[1:]
runpy.run_path({main!r}, run_name='__main__')
"""


def command(form, name, data_root, logdir, iterations):
    changes, extra = FORMS[form]
    flags, _ = flags_of(name, iterations)
    script = WRAPPER.format(repo=str(REPO), changes=changes, main=str(REPO / 'main.py'))
    return [sys.executable, '-u', '-c', script] + flags + extra + ['--logdir=' + str(logdir),
                                                                  '--data_root=' + str(data_root)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('configs', nargs='*', default=['omniglot20'], choices=[n for n in MEASURED if n != 'sinusoid'])
    parser.add_argument('--forms', default=','.join(FORMS), help='which of ' + ', '.join(FORMS))
    parser.add_argument('--rounds', type=int, default=2)
    parser.add_argument('--iterations', type=int, default=None)
    parser.add_argument('--data_root', type=Path, default=None)
    args = parser.parse_args()
    forms = [f for f in args.forms.split(',') if f]
    unknown = [f for f in forms if f not in FORMS]
    if unknown:
        parser.error('--forms: no form {}; the forms are {}'.format(', '.join(unknown), ', '.join(FORMS)))
    print('ONEDNN_MAX_CPU_ISA={}'.format(os.environ.get('ONEDNN_MAX_CPU_ISA', '(unset: the CPU\'s best)')), flush=True)
    tmp = Path(tempfile.mkdtemp(prefix='forms_'))
    data_root = (args.data_root or tmp / 'data').resolve()
    data_root.mkdir(parents=True, exist_ok=True)
    results = {}
    try:
        for round_index in range(args.rounds):
            order = forms if round_index % 2 == 0 else list(reversed(forms))
            for name in args.configs:
                prepare_data(flags_of(name)[1], data_root)
                for form in order:
                    logdir = tmp / 'logs' / '{}_{}_{}'.format(name, form, round_index)
                    startup, ms = timed_run(command(form, name, data_root, logdir, args.iterations), REPO, logdir)
                    results.setdefault((name, form), []).append(ms)
                    print('round {} {:<12s} {:<15s} start-up {:6.1f} s  {:8.2f} ms/iteration'.format(
                        round_index + 1, name, form, startup, ms), flush=True)
                    shutil.rmtree(logdir, ignore_errors=True)
        print('\nMedians over rounds, ms per meta-iteration (and / auto):')
        for name in args.configs:
            auto = statistics.median(results[(name, 'auto')]) if 'auto' in forms else None
            cells = []
            for form in forms:
                ms = statistics.median(results[(name, form)])
                cells.append('{} {:.1f}{}'.format(form, ms, ' ({:.2f}x)'.format(ms / auto) if auto else ''))
            print('{}: {}'.format(name, ', '.join(cells)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    main()
