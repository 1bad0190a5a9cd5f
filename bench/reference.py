"""The reference implementation (cbfinn/maml at its pinned commit) and the TensorFlow 1.15 it runs on.

    python bench/reference.py --status         # where its code and venv are, or how to give them
    python bench/reference.py --fetch          # clone the upstream repository at the pinned commit
    python bench/reference.py --build_venv     # a Python 3.7 venv with TensorFlow 1.15 (needs a python3.7)
    python bench/reference.py [--moments] [--data_root DIR] -- MAIN_PY_FLAGS...   # run its main.py

Where things are found (one place each):
- the code: $MAML_REFERENCE_DIR (a folder holding the reference's main.py, maml.py, ...), else the
  clone `--fetch` makes under ~/.cache/maml-reference/. Its files must be the pinned commit's.
- the venv: $MAML_REFERENCE_VENV, else ~/.cache/maml-reference-tf115 (made by `--build_venv`).

Every run gets a fresh copy of the code in a temporary folder, `data/` linked to --data_root's
omniglot_resized/ and miniImagenet/. `--moments` computes batch norm from tf.nn.moments instead of the
fused kernel (contrib_moments.py): the math the paper's TensorFlow used, and what the port computes.
The reference does not create LOGDIR/EXPERIMENT itself when --log=False.

Used by reproduce.py --reference_eval, bench/bench_side_by_side.py and the tests that run the reference.
"""
import argparse
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
UPSTREAM = 'https://github.com/cbfinn/maml'
COMMIT = 'a7f45f1bcd7457fe97b227a21e89b8a82cc5fa49'
# sha256 of the pinned commit's Python files: a folder given by MAML_REFERENCE_DIR must hold these.
PINNED_FILES = {
    'main.py': 'a3549e7b41b96116f2ac7fb0a8f90a32035ee0eb660dd38855e034200863ce2f',
    'maml.py': 'f5c686a54ad9ca3f31cc43f395ed672e6d97aebd2fd7c6d7964ad7396d03fffc',
    'utils.py': '5c0d0627a1384912abb064b6a0a8292403ea63554650712a19a2284a3baabfbf',
    'data_generator.py': '30551603a8d0e21de125149d21244387bb8d83c71f45205f6dfcedc7d4a49d97',
    'special_grads.py': '1537e57839caa224316ec2a18e07cfca01aeaf44a364e4c69f5b843aff2bfcfa',
}
CODE_ENV, VENV_ENV = 'MAML_REFERENCE_DIR', 'MAML_REFERENCE_VENV'
CACHE = Path.home() / '.cache'
VENV_PACKAGES = ['tensorflow==1.15.5', 'numpy==1.18.5', 'protobuf==3.20.3', 'pillow']
CONTRIB_IMPORT = 'from tensorflow.contrib.layers.python import layers as tf_layers'
HOW = ('set {}=DIR (the reference\'s code, {} at {}) or run `python bench/reference.py --fetch`; set {}=VENV '
       '(Python 3.7, TensorFlow 1.15) or run `python bench/reference.py --build_venv`').format(
           CODE_ENV, UPSTREAM, COMMIT[:7], VENV_ENV)


class ReferenceMissing(Exception):
    """The reference's code or venv is not where the settings say; the message says how to give it."""


def fetched_dir():
    return CACHE / 'maml-reference' / ('maml-' + COMMIT[:7])


def code_dir():
    """The reference's code folder (MAML_REFERENCE_DIR, else the --fetch clone), checked against the pin."""
    given = os.environ.get(CODE_ENV)
    folder = Path(given).expanduser() if given else fetched_dir()
    if not (folder / 'main.py').is_file():
        where = '{}={}'.format(CODE_ENV, given) if given else 'no {} set and no clone at {}'.format(CODE_ENV, folder)
        raise ReferenceMissing('the reference\'s code is not there ({}); {}'.format(where, HOW))
    changed = [name for name, digest in PINNED_FILES.items()
               if not (folder / name).is_file() or _sha256(folder / name) != digest]
    if changed:
        raise ReferenceMissing('{} is not {} at {}: {} differ(s); point {} at that commit\'s files'.format(
            folder, UPSTREAM, COMMIT[:7], ', '.join(changed), CODE_ENV))
    return folder


def venv_dir():
    return Path(os.environ.get(VENV_ENV) or CACHE / 'maml-reference-tf115').expanduser()


def python():
    """The reference venv's interpreter."""
    path = venv_dir() / 'bin' / 'python'
    if not path.is_file():
        raise ReferenceMissing('no TensorFlow 1.15 venv at {}; {}'.format(venv_dir(), HOW))
    return path


def problem():
    """None if the reference can run here, else one line saying what is missing and how to give it."""
    try:
        code_dir()
        python()
    except ReferenceMissing as missing:
        return str(missing)
    return None


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fetch():
    """Clones the upstream repository at the pinned commit into the cache (network)."""
    target = fetched_dir()
    if (target / 'main.py').is_file():
        return target
    partial = Path(str(target) + '.partial')
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    for command in (['git', 'clone', '--quiet', UPSTREAM, str(partial)],
                    ['git', '-C', str(partial), 'checkout', '--quiet', COMMIT]):
        if subprocess.run(command).returncode != 0:
            shutil.rmtree(partial, ignore_errors=True)
            raise ReferenceMissing('could not clone {} at {} (no network?); download it by hand and set {}'.format(
                UPSTREAM, COMMIT[:7], CODE_ENV))
    partial.rename(target)
    return target


def find_python37():
    candidates = sorted(glob.glob(os.path.join(os.environ.get('PYENV_ROOT', str(Path.home() / '.pyenv')),
                                               'versions', '3.7*', 'bin', 'python')))
    found = shutil.which('python3.7')
    return candidates[0] if candidates else found


def build_venv():
    """Makes the TensorFlow 1.15 venv at venv_dir() (from the package registry) unless it exists."""
    target = venv_dir()
    if (target / 'bin' / 'python').is_file():
        return target
    py37 = find_python37()
    if not py37:
        raise ReferenceMissing('TensorFlow 1.15 needs a Python 3.7 (none found in pyenv or on PATH); install one '
                               'or point {} at a venv that has TensorFlow 1.15'.format(VENV_ENV))
    ok = (subprocess.run([py37, '-m', 'venv', str(target)]).returncode == 0 and
          subprocess.run([str(target / 'bin' / 'python'), '-m', 'pip', 'install', '-q'] + VENV_PACKAGES).returncode == 0)
    if not ok:
        shutil.rmtree(target, ignore_errors=True)
        raise ReferenceMissing('could not build the TensorFlow 1.15 venv at {}'.format(target))
    return target


def env(**extra):
    """The environment of a reference run: without TF2_BEHAVIOR, which importing TF 2 sets in its own
    process (and so its children's), and which would turn TF 1.15 eager."""
    environment = dict(os.environ, **extra)
    environment.pop('TF2_BEHAVIOR', None)
    return environment


def working_copy(moments=False, data_root=None):
    """A fresh copy of the reference's code in a temporary folder, its data/ linked to data_root's
    omniglot_resized/ and miniImagenet/ (those present); with `moments`, batch norm from moments."""
    work = Path(tempfile.mkdtemp(prefix='reference_'))
    for entry in code_dir().iterdir():   # (Python 3.7's copytree cannot copy into an existing folder)
        if entry.name in ('.git', 'logs'):
            continue
        (shutil.copytree if entry.is_dir() else shutil.copy)(str(entry), str(work / entry.name))
    if moments:
        shutil.copy(HERE / 'contrib_moments.py', work)
        utils = work / 'utils.py'
        source = utils.read_text()
        assert CONTRIB_IMPORT in source
        utils.write_text(source.replace(CONTRIB_IMPORT, 'import contrib_moments as tf_layers'))
    data = work / 'data'
    data.mkdir(exist_ok=True)
    for name in ('omniglot_resized', 'miniImagenet'):
        if data_root is not None and (Path(data_root) / name).is_dir():
            target = data / name
            if target.is_symlink() or target.is_file():
                target.unlink()
            elif target.is_dir():
                shutil.rmtree(target)
            target.symlink_to(Path(data_root).resolve() / name, target_is_directory=True)
    return work


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--status', action='store_true', help='say where the code and the venv are')
    parser.add_argument('--fetch', action='store_true', help='clone {} at {}'.format(UPSTREAM, COMMIT[:7]))
    parser.add_argument('--build_venv', action='store_true', help='make the TensorFlow 1.15 venv')
    parser.add_argument('--moments', action='store_true', help='batch norm from tf.nn.moments, not the fused kernel')
    parser.add_argument('--data_root', type=Path, default=None, help='folder of omniglot_resized/, miniImagenet/')
    parser.add_argument('flags', nargs='*', help='main.py flags of the reference (after --)')
    args = parser.parse_args(argv)
    try:
        if args.fetch:
            print('reference code: {}'.format(fetch()))
        if args.build_venv:
            print('reference venv: {}'.format(build_venv()))
        if args.status:
            missing = problem()
            print(missing or 'reference code: {}\nreference venv: {}'.format(code_dir(), venv_dir()))
            return 1 if missing else 0
        if args.flags:
            work = working_copy(args.moments, args.data_root)
            print('reference copy: {}'.format(work), file=sys.stderr)
            return subprocess.run([str(python()), 'main.py'] + args.flags, cwd=str(work), env=env()).returncode
    except ReferenceMissing as missing:
        print('error: {}'.format(missing), file=sys.stderr)
        return 2
    if not (args.fetch or args.build_venv):
        parser.print_usage()
    return 0


if __name__ == '__main__':
    sys.exit(main())
