"""The port against the reference's own code, side by side on this machine.

    python bench/bench_side_by_side.py [sinusoid omniglot5 omniglot5_first_order omniglot20 mini1]
        [--rounds 3] [--sides reference,moments,port,port_tf13] [--iterations N] [--data_root DIR]

For every configuration (the paper's commands, shortened) each round runs the reference as shipped
(TF 1.15, fused batch norm; where its code and venv are found: bench/reference.py), the reference
computing batch norm from moments (`--moments`, whose meta-gradient on TF 1.15 is TF 1.3's) and this
port, one after the other, the order turned around every round. `port_tf13` is the port with
`--moments_stop_gradient=True`: the same math as `moments`, so `port_tf13 / moments` is the
same-math ratio (the port's default computes TF 1.2's exact meta-gradient, one more term).
`port_off` is the port with `--fast_paths=off`: maml.py's plain definition, what the speed-ups save.
`before` (with `--before DIR`): the port as checked out in DIR (e.g. a `git worktree` of an earlier
commit), run with this checkout's interpreter: a change's effect, measured in the same run. Each
run's time per meta-iteration comes from the moments its progress lines appear (summaries and
validation included, start-up excluded): from the first printed iteration to the last. Prints the
medians over the rounds, the ratios port / reference, and the start-up times (process start to "Done
initializing"; the port's first run decodes the images, later ones read its pixel cache). Nothing
else heavy may run meanwhile. Without the reference, it says what is missing and prints the port's
figures alone. Omniglot comes from --data_root's omniglot_resized/, else $MAML_OMNIGLOT_ZIPS, else
the official download (bench_train.prepare_data).
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference  # noqa: E402
from bench_train import CONFIGS, REPO, prepare_data  # noqa: E402

MEASURED = {   # configuration: (bench_train's flags, iterations to run, progress lines every N iterations)
    'sinusoid': ('sinusoid', [], 5001, 1000),
    'omniglot5': ('omniglot5', [], 401, 100),
    'omniglot5_first_order': ('omniglot5', ['--stop_grad=True'], 401, 100),
    'omniglot20': ('omniglot20', [], 301, 100),
    'mini1': ('mini1', [], 301, 100),
}
SIDES = ('reference', 'moments', 'port', 'port_tf13', 'port_off', 'before')
PORT_SIDES = {'port': [], 'port_tf13': ['--moments_stop_gradient=True'], 'port_off': ['--fast_paths=off']}


def flags_of(name, iterations=None):
    base, extra, default_iterations, _ = MEASURED[name]
    iterations = iterations or default_iterations
    flags = [f for f in CONFIGS[base][0] if not f.startswith('--metatrain_iterations')]
    return flags + extra + ['--metatrain_iterations=%d' % iterations], CONFIGS[base][1]


def command(side, name, data_root, logdir, iterations=None, before=None):
    """(command line, working folder) of one run."""
    flags, kind = flags_of(name, iterations)
    flags = flags + ['--logdir=' + str(logdir)]
    if side == 'before':
        return ([sys.executable, '-u', str(Path(before) / 'main.py')] + flags + ['--data_root=' + str(data_root)],
                Path(before))
    if side in PORT_SIDES:
        return ([sys.executable, '-u', str(REPO / 'main.py')] + flags + PORT_SIDES[side] +
                ['--data_root=' + str(data_root)], REPO)
    work = reference.working_copy(moments=side == 'moments', data_root=data_root)
    return [str(reference.python()), '-u', 'main.py'] + flags, work


def timed_run(cmd, cwd, logdir):
    """Runs cmd; returns (seconds to 'Done initializing', ms per iteration between the first and the
    last progress line)."""
    logdir.mkdir(parents=True, exist_ok=True)
    env = reference.env(PYTHONUNBUFFERED='1', TF_CPP_MIN_LOG_LEVEL='3')
    start = time.perf_counter()
    with open(logdir / 'stderr.txt', 'w') as err:
        process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=str(cwd))
        startup, marks = None, []
        for line in process.stdout:
            now = time.perf_counter() - start
            if line.startswith('Done initializing') and startup is None:
                startup = now
            elif line.startswith('Iteration '):
                marks.append((int(line.split()[1].rstrip(':')), now))
        if process.wait() != 0:
            raise SystemExit('failed ({}): {}\n{}'.format(process.returncode, ' '.join(cmd),
                                                          (logdir / 'stderr.txt').read_text()[-2000:]))
    (first_itr, first_t), (last_itr, last_t) = marks[0], marks[-1]
    return startup, 1000.0 * (last_t - first_t) / (last_itr - first_itr)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('configs', nargs='*', default=list(MEASURED), choices=list(MEASURED))
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--sides', default=','.join(SIDES), help='which of ' + ', '.join(SIDES))
    parser.add_argument('--iterations', type=int, default=None,
                        help='iterations per run instead of each configuration\'s own (two progress lines at least)')
    parser.add_argument('--data_root', type=Path, default=None)
    parser.add_argument('--before', type=Path, default=None, help='a checkout of the port to run as the side `before`')
    args = parser.parse_args()
    for name in args.configs:
        interval = MEASURED[name][3]
        if args.iterations is not None and args.iterations <= 2 * interval:
            parser.error('--iterations={} is too few for {}: the time per iteration is read between two progress '
                         'lines, every {} iterations; give at least {}'.format(args.iterations, name, interval,
                                                                                 2 * interval + 1))
    sides = [s for s in args.sides.split(',') if s]
    unknown = [s for s in sides if s not in SIDES]
    if unknown:
        parser.error('--sides: no side {}; the sides are {}'.format(', '.join(unknown), ', '.join(SIDES)))
    if 'before' in sides and not (args.before and (args.before / 'main.py').is_file()):
        parser.error('the side `before` needs --before DIR, a checkout holding main.py')
    missing = reference.problem() if any(s not in PORT_SIDES for s in sides) else None
    if missing:
        print('The reference cannot run here ({}): the port\'s figures alone.'.format(missing))
        sides = [s for s in sides if s in PORT_SIDES] or ['port']
    first_port = next((s for s in sides if s in PORT_SIDES), None)   # its first run decodes the images
    tmp = Path(tempfile.mkdtemp(prefix='side_by_side_'))
    data_root = (args.data_root or tmp / 'data').resolve()   # the reference's copy links to it from elsewhere
    data_root.mkdir(parents=True, exist_ok=True)
    results = {}   # (config, side) -> [(startup, ms)]
    try:
        for round_index in range(args.rounds):
            order = sides if round_index % 2 == 0 else list(reversed(sides))
            for name in args.configs:
                kind = flags_of(name)[1]
                if kind:
                    prepare_data(kind, data_root)
                for side in order:
                    logdir = tmp / 'logs' / '{}_{}_{}'.format(name, side, round_index)
                    if side == first_port and round_index == 0:
                        shutil.rmtree(data_root / '.cache', ignore_errors=True)   # a first run: decoding
                    cmd, cwd = command(side, name, data_root, logdir, args.iterations, args.before)
                    startup, ms = timed_run(cmd, cwd, logdir)
                    if cwd not in (REPO, args.before):
                        shutil.rmtree(cwd, ignore_errors=True)
                    results.setdefault((name, side), []).append((startup, ms))
                    print('round {} {:<22s} {:<9s} start-up {:6.1f} s  {:8.2f} ms/iteration'.format(
                        round_index + 1, name, side, startup, ms), flush=True)
                    shutil.rmtree(logdir, ignore_errors=True)
        print_table(args.configs, sides, results, first_port)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


RATIOS = (('port', 'reference'), ('port', 'moments'), ('port_tf13', 'moments'), ('port_off', 'reference'),
          ('before', 'reference'), ('port', 'before'))


def print_table(configs, sides, results, first_port):
    ratios = [(a, b) for a, b in RATIOS if a in sides and b in sides]
    print('\nMedians over rounds, ms per meta-iteration (summaries and validation included):')
    head = '| config | ' + ' | '.join(sides) + ' | ' + ''.join('{} / {} | '.format(a, b) for a, b in ratios)
    head += 'start-up: ' + ', '.join(sides) + ' ({}: first run / later runs) |'.format(first_port)
    print(head)
    print('|' + '---|' * (head.count('|') - 1))
    for name in configs:
        ms = {s: statistics.median(m for _, m in results[(name, s)]) for s in sides}
        cells = ['{:.1f}'.format(ms[s]) for s in sides] + ['{:.2f}x'.format(ms[a] / ms[b]) for a, b in ratios]
        startups = []
        for s in sides:
            times = [t for t, _ in results[(name, s)]]
            if s == first_port:
                startups.append('{:.1f} / {:.1f} s'.format(times[0], statistics.median(times[1:] or times)))
            else:
                startups.append('{:.1f} s'.format(statistics.median(times)))
        print('| {} | {} | {} |'.format(name, ' | '.join(cells), ', '.join(startups)))


if __name__ == '__main__':
    main()
