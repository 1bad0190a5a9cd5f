"""Times the paper's training commands as users run them (main.py in a subprocess).

    python bench/bench_train.py sinusoid [omniglot5 omniglot20 mini1 mini5] [--data_root DIR]
    python bench/bench_train.py omniglot20 --startup_only --rounds 5 --data_root data

Prints, per configuration: start-up seconds (process start to the first iteration; the
`graph` part is main.py's own "Data and graph ready" figure, after imports), steady-state
milliseconds per meta-iteration (median over the progress intervals after the first), peak
resident memory of the process, and what the run wrote (checkpoint and events file sizes).
Omniglot: --data_root's omniglot_resized/ if it is there, else prepared into --data_root (a temporary
folder by default) from $MAML_OMNIGLOT_ZIPS, else from the official download (checked against its
pinned checksums); MiniImagenet uses generated stand-in images of the real size.

--startup_only stops each run at "Done initializing" and prints only its start-up; with --rounds
it runs every configuration that many times, interleaved, and prints the first run and the median
of the later ones (the first may decode the images into the pixel cache; later runs read it).
"""
import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'data'))

CONFIGS = {
    'sinusoid': (['--datasource=sinusoid', '--metatrain_iterations=6000', '--norm=None', '--update_batch_size=10'], None),
    'omniglot5': (['--datasource=omniglot', '--metatrain_iterations=600', '--meta_batch_size=32', '--update_batch_size=1',
                   '--update_lr=0.4', '--num_updates=1'], 'omniglot'),
    'omniglot20': (['--datasource=omniglot', '--metatrain_iterations=201', '--meta_batch_size=16', '--update_batch_size=1',
                    '--num_classes=20', '--update_lr=0.1', '--num_updates=5'], 'omniglot'),
    'mini1': (['--datasource=miniimagenet', '--metatrain_iterations=201', '--meta_batch_size=4', '--update_batch_size=1',
               '--update_lr=0.01', '--num_updates=5', '--num_classes=5', '--num_filters=32', '--max_pool=True'], 'mini'),
    'mini5': (['--datasource=miniimagenet', '--metatrain_iterations=201', '--meta_batch_size=4', '--update_batch_size=5',
               '--update_lr=0.01', '--num_updates=5', '--num_classes=5', '--num_filters=32', '--max_pool=True'], 'mini'),
}


def prepare_data(kind, data_root):
    if kind == 'omniglot' and not (data_root / 'omniglot_resized').is_dir():
        import prepare_omniglot
        zips = os.environ.get(prepare_omniglot.ZIPS_ENV)
        prepare_omniglot.prepare(data_root / 'omniglot_resized', source_dir=Path(zips) if zips else None)
    if kind == 'mini' and not (data_root / 'miniImagenet').is_dir():
        from tests.standin import make_miniimagenet_prepared
        make_miniimagenet_prepared(data_root / 'miniImagenet', classes=(64, 16, 20), images_per_class=600)


def run(name, data_root, logdir, iterations=None, startup_only=False):
    """One fresh training run of configuration `name`, its figures printed as one line (with
    startup_only: stopped once initialized; returns the start-up seconds)."""
    flags, kind = CONFIGS[name]
    if iterations:
        flags = [f for f in flags if not f.startswith('--metatrain_iterations')]
        flags.append('--metatrain_iterations=%d' % iterations)
    logdir = Path(tempfile.mkdtemp(dir=logdir))
    if kind:
        prepare_data(kind, data_root)
    cmd = [sys.executable, '-u', str(REPO / 'main.py'), *flags, '--logdir=' + str(logdir),
           '--data_root=' + str(data_root)]
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    startup = graph = None
    marks = []   # (iteration, seconds) as each progress line arrives: finer than the printed it/s
    for line in proc.stdout:
        if line.startswith('Data and graph ready'):
            graph = float(re.findall(r'[\d.]+', line)[0])
        elif line.startswith('Done initializing') and startup is None:
            startup = time.time() - start
            if startup_only:
                proc.kill()
                proc.wait()
                print('{:<10s} start-up {:5.1f} s (data+graph {:4.1f} s)'.format(name, startup, graph), flush=True)
                return startup
        elif line.startswith('Iteration '):
            marks.append((int(line.split()[1].rstrip(':')), time.time() - start))
    if proc.wait() != 0:
        raise SystemExit('{} failed: {}'.format(name, ' '.join(cmd)))
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    intervals = [1000.0 * (t - t0) / (itr - itr0) for (itr0, t0), (itr, t) in zip(marks, marks[1:])]
    steady = intervals[1:] or intervals     # the first interval holds the warm-up
    ms = statistics.median(steady)
    written = {}
    for path in logdir.rglob('*'):
        kind_of = 'events' if 'tfevents' in path.name else 'checkpoint' if path.name.startswith('model') else None
        if kind_of:
            written[kind_of] = written.get(kind_of, 0) + path.stat().st_size
    ckpts = len(list(logdir.rglob('model*.index')))
    print('{:<10s} start-up {:5.1f} s (data+graph {:4.1f} s) | {:7.2f} ms/meta-iteration (median of {}) | '
          'peak RSS {:6.0f} MB | per checkpoint {:.2f} MB, events {:.2f} MB'.format(
              name, startup, graph, ms, len(steady), peak_mb,
              written.get('checkpoint', 0) / max(ckpts, 1) / 2 ** 20, written.get('events', 0) / 2 ** 20), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('configs', nargs='*', default=['sinusoid'], choices=sorted(CONFIGS))
    parser.add_argument('--data_root', type=Path, default=None)
    parser.add_argument('--iterations', type=int, default=None,
                        help='override the iterations (101: one progress interval, warm-up included)')
    parser.add_argument('--startup_only', action='store_true',
                        help='stop each run once initialized; time the start-up alone')
    parser.add_argument('--rounds', type=int, default=1, help='with --startup_only: runs per configuration')
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_root = args.data_root or Path(tmp) / 'data'
        data_root.mkdir(parents=True, exist_ok=True)
        if args.startup_only:
            startups = {}
            for _ in range(args.rounds):
                for name in args.configs:
                    logs = Path(tmp) / 'logs'
                    logs.mkdir(exist_ok=True)
                    startups.setdefault(name, []).append(run(name, data_root, logs, startup_only=True))
            for name, times in startups.items():
                later = times[1:] or times
                print('{:<10s} start-up: first run {:.1f} s, later runs median {:.1f} s (min {:.1f}, max {:.1f}; {} runs)'
                      .format(name, times[0], statistics.median(later), min(later), max(later), len(later)))
            return
        for name in args.configs:
            # Each child's peak is reported on its own: RUSAGE_CHILDREN keeps the largest so far,
            # so run memory-heavy configurations last or one at a time.
            logs = Path(tmp) / 'logs'
            logs.mkdir(exist_ok=True)
            run(name, data_root, logs, args.iterations)


if __name__ == '__main__':
    main()
