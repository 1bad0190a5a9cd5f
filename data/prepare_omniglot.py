"""Prepare Omniglot for MAML: 50 alphabet folders of 28x28 images.

    python data/prepare_omniglot.py                 # download the two zips
    python data/prepare_omniglot.py --from DIR      # use DIR/images_*.zip
    python data/prepare_omniglot.py --to OUT    # default data/omniglot_resized

Reads images_background.zip and images_evaluation.zip, resizes every image
to 28x28 with LANCZOS straight from the zips (as data/resize_images.py does)
and writes OUT/ALPHABET/characterNN/*.png.  The result is built in a sibling
folder OUT.partial-PID and renamed to OUT only once it checks out, so OUT is
either absent or complete.  Rerunning on a complete OUT does nothing.
"""
import argparse
import hashlib
import io
import multiprocessing
import os
import shutil
import signal
import stat
import struct
import sys
import tempfile
import urllib.request
import zipfile
import zlib
from collections import namedtuple
from pathlib import Path

from PIL import Image

DATA_DIR = Path(__file__).resolve().parent
# data/ is no package: make the sibling resize_images importable however
# this file was loaded (as a script, from tests, from the training code).
if str(DATA_DIR) not in sys.path:
    sys.path.insert(0, str(DATA_DIR))
from resize_images import IMAGE_SIZE, resize_image  # noqa: E402

REPO_ROOT = DATA_DIR.parent
DEFAULT_DEST = REPO_ROOT / 'data' / 'omniglot_resized'
ZIP_NAMES = ('images_background.zip', 'images_evaluation.zip')
URL_BASE = 'https://github.com/brendenlake/omniglot/raw/master/python/'
EXPECTED_ALPHABETS = 50
EXPECTED_CHARACTERS = 1623
# The official zips, pinned: a download that differs is refused.
ZIP_SHA256 = {
    'images_background.zip': '8a23b104cd953eb466857267ff2f910b9159c4c5bfccc5ed76aa67744e5ccf33',
    'images_evaluation.zip': 'cb1abb90dabf553a47b7e5319ff42b18fef1bd113933b92ca327767b2ca03768',
}
# Where tests and benchmarks find the two official zips (a folder holding both).
ZIPS_ENV = 'MAML_OMNIGLOT_ZIPS'
DRAWINGS_PER_CHARACTER = 20
PARTIAL_MARK = '.partial-'
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
IMAGE_READ_ERRORS = (OSError, EOFError, SyntaxError, ValueError, zlib.error,
                     zipfile.BadZipFile)


class PrepareError(Exception):
    """Bad input or environment; the message says what is wrong and the fix."""


def zip_url(zip_name):
    return URL_BASE + zip_name


# ---------------------------------------------------------------- checking

class Expected(namedtuple('Expected', 'alphabets characters')):
    """How many alphabets and characters a prepared folder must hold."""


FULL_SET = Expected(EXPECTED_ALPHABETS, EXPECTED_CHARACTERS)


class Survey(namedtuple('Survey', 'alphabets characters images problems')):
    """What a folder holds, and how it differs from complete Omniglot."""

    @property
    def complete(self):
        return not self.problems

    def counts(self):
        return (f'{self.alphabets} alphabets, {self.characters} characters, '
                f'{self.images} images')

    def describe(self):
        return f'found {self.counts()}; ' + '; '.join(self.problems)


def png_size(path):
    """(width, height) from the PNG header, or None if path is no PNG."""
    with open(path, 'rb') as file:
        head = file.read(24)
    if len(head) < 24 or head[:8] != PNG_SIGNATURE or head[12:16] != b'IHDR':
        return None
    return struct.unpack('>II', head[16:24])


def visible_entries(folder):
    entries = [e for e in os.scandir(folder) if not e.name.startswith('.')]
    return sorted(entries, key=lambda e: e.name)


def survey_folder(root, expected=FULL_SET):
    """Count alphabets/characters/images under root and list what is off
    (against `expected`: the full set unless a test prepares a subset).

    Reads only PNG headers, so checking a complete folder takes well
    under a second.
    """
    alphabets = [e for e in visible_entries(root) if e.is_dir()]
    characters = [c for a in alphabets for c in visible_entries(a.path)]
    stray = [c.path for c in characters if not c.is_dir()]
    characters = [c for c in characters if c.is_dir()]
    wrong_counts, wrong_sizes, images = [], [], 0
    for character in characters:
        pngs = [e.path for e in visible_entries(character.path)
                if e.name.lower().endswith('.png')]
        images += len(pngs)
        if len(pngs) != DRAWINGS_PER_CHARACTER:
            wrong_counts.append((character.path, len(pngs)))
        wrong_sizes += [(p, s) for p in pngs for s in [png_size(p)]
                        if s != IMAGE_SIZE]
    problems = count_problems(len(alphabets), len(characters), expected)
    problems += detail_problems(root, stray, wrong_counts, wrong_sizes)
    return Survey(len(alphabets), len(characters), images, problems)


def count_problems(alphabets, characters, expected=FULL_SET):
    problems = []
    if alphabets != expected.alphabets:
        problems.append(f'expected {expected.alphabets} alphabets')
    if characters != expected.characters:
        problems.append(f'expected {expected.characters} characters')
    return problems


def detail_problems(root, stray, wrong_counts, wrong_sizes):
    def rel(path):
        return os.path.relpath(path, root)

    problems = []
    if stray:
        problems.append(f'{len(stray)} files where character folders belong '
                        f'(e.g. {rel(stray[0])})')
    if wrong_counts:
        path, count = wrong_counts[0]
        problems.append(
            f'{len(wrong_counts)} characters without '
            f'{DRAWINGS_PER_CHARACTER} drawings '
            f'(e.g. {rel(path)} has {count})')
    if wrong_sizes:
        path, size = wrong_sizes[0]
        found = 'not a PNG' if size is None else f'{size[0]}x{size[1]}'
        problems.append(
            f'{len(wrong_sizes)} images not {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} '
            f'(e.g. {rel(path)} is {found})')
    return problems


# ------------------------------------------------------- reading the zips

def locate_zips(source_dir):
    source_dir = Path(source_dir)
    if not source_dir.is_dir():
        raise PrepareError(
            f'folder {source_dir} does not exist; give the folder holding '
            f'{" and ".join(ZIP_NAMES)}, or run without --from to download '
            'them')
    missing = [n for n in ZIP_NAMES if not (source_dir / n).is_file()]
    if len(missing) == 1:
        raise PrepareError(
            f'{missing[0]} not found in {source_dir}; download it from '
            f'{zip_url(missing[0])} or run without --from')
    if missing:
        raise PrepareError(
            f'{" and ".join(missing)} not found in {source_dir}; download '
            f'{" and ".join(map(zip_url, missing))} or run without --from')
    return [source_dir / n for n in ZIP_NAMES]


def check_member_is_safe(info, zip_path):
    name = info.filename
    parts = name.replace('\\', '/').split('/')
    is_link = stat.S_ISLNK(info.external_attr >> 16)
    is_absolute = name.startswith(('/', '\\')) or name[1:2] == ':'
    if not (is_link or is_absolute or '..' in parts):
        return
    problem = ('is a symbolic link' if is_link
               else 'would land outside the target folder')
    raise PrepareError(
        f'refusing {zip_path}: member {name!r} {problem}; this is not the '
        f'official Omniglot zip, download it again from '
        f'{zip_url(Path(zip_path).name)}')


def image_relpath(info):
    """ALPHABET/characterNN/NAME.png for an image member laid out as
    TOP/ALPHABET/characterNN/NAME.png, else None."""
    parts = info.filename.split('/')
    is_image = (len(parts) == 4 and parts[0] != '__MACOSX'
                and parts[-1].lower().endswith('.png')
                and not any(p.startswith('.') or not p for p in parts))
    return '/'.join(parts[1:]) if is_image else None


def list_images(zip_path):
    """[(member name, path relative to OUT)] for every image of one zip."""
    try:
        with zipfile.ZipFile(zip_path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError) as error:
        raise PrepareError(
            f'{zip_path} is not a readable zip file ({error}); download it '
            f'again from {zip_url(Path(zip_path).name)}') from None
    for info in infos:
        check_member_is_safe(info, zip_path)
    images = [(i.filename, rel) for i in infos
              for rel in [image_relpath(i)] if rel is not None]
    if not images:
        example = next((i.filename for i in infos if not i.is_dir()), 'none')
        raise PrepareError(
            f'{zip_path} holds no images laid out as '
            f'TOP/ALPHABET/characterNN/NAME.png ({len(infos)} members, e.g. '
            f'{example}); download the official zip from '
            f'{zip_url(Path(zip_path).name)}')
    return images


def check_alphabets_disjoint(images_by_zip):
    seen = {}
    for zip_path, images in images_by_zip.items():
        for alphabet in {relpath.split('/')[0] for _, relpath in images}:
            if alphabet in seen:
                raise PrepareError(
                    f'alphabet {alphabet} is in both {seen[alphabet]} and '
                    f'{zip_path}; use the official zips from {URL_BASE}')
            seen[alphabet] = zip_path


# ------------------------------------------------------------ converting

_worker_archives = {}


def open_worker_archive(zip_path):
    """One ZipFile per zip and worker process, reused across chunks."""
    if zip_path not in _worker_archives:
        _worker_archives[zip_path] = zipfile.ZipFile(zip_path)
    return _worker_archives[zip_path]


def convert_image(archive, zip_path, member, target):
    try:
        with Image.open(io.BytesIO(archive.read(member))) as image:
            resized = resize_image(image)
    except IMAGE_READ_ERRORS as error:
        raise PrepareError(
            f'cannot read image {member} in {zip_path} ({error}); the zip is '
            f'damaged: download it again from '
            f'{zip_url(Path(zip_path).name)}') from None
    try:
        resized.save(target)
    except OSError as error:
        raise PrepareError(f'cannot write {target} ({error})') from None


def convert_images(archive, zip_path, out_root, images):
    for member, relpath in images:
        convert_image(archive, zip_path, member, Path(out_root, relpath))


def convert_chunk_in_worker(chunk):
    zip_path, out_root, images = chunk
    convert_images(open_worker_archive(zip_path), zip_path, out_root, images)


def chunks_by_character(images_by_zip, out_root):
    for zip_path, images in images_by_zip.items():
        by_folder = {}
        for member, relpath in images:
            folder = relpath.rsplit('/', 1)[0]
            by_folder.setdefault(folder, []).append((member, relpath))
        for folder_images in by_folder.values():
            yield str(zip_path), str(out_root), folder_images


def ignore_sigint():
    # Ctrl-C is handled once, by the parent (which cleans up), not by every
    # worker printing its own traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def convert_all(images_by_zip, out_root, workers):
    folders = {rel.rsplit('/', 1)[0] for images in images_by_zip.values()
               for _, rel in images}
    for folder in sorted(folders):
        (out_root / folder).mkdir(parents=True, exist_ok=True)
    if workers <= 1:
        for zip_path, images in images_by_zip.items():
            with zipfile.ZipFile(zip_path) as archive:
                convert_images(archive, zip_path, out_root, images)
        return
    chunks = list(chunks_by_character(images_by_zip, out_root))
    # spawn, not fork: the caller may be a process with TensorFlow threads.
    context = multiprocessing.get_context('spawn')
    with context.Pool(workers, initializer=ignore_sigint) as pool:
        for _ in pool.imap_unordered(convert_chunk_in_worker, chunks,
                                     chunksize=8):
            pass


# ---------------------------------------------- partial folder handling

def partial_folder(dest):
    return dest.parent / f'{dest.name}{PARTIAL_MARK}{os.getpid()}'


def process_is_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(dest):
    """Delete partial folders of runs that died (their pid is gone)."""
    if not dest.parent.is_dir():
        return
    for path in dest.parent.glob(f'{dest.name}{PARTIAL_MARK}*'):
        pid = path.name[len(dest.name) + len(PARTIAL_MARK):]
        if pid.isdigit() and (int(pid) == os.getpid()
                              or not process_is_alive(int(pid))):
            shutil.rmtree(path, ignore_errors=True)


def move_into_place(partial, dest, expected=FULL_SET):
    try:
        os.replace(partial, dest)
    except OSError:
        # A concurrent run may have finished first; its result is as good.
        if not (dest.is_dir() and survey_folder(dest, expected).complete):
            raise PrepareError(f'cannot rename {partial} to {dest}; '
                               f'remove {dest} and rerun') from None
        shutil.rmtree(partial, ignore_errors=True)


# --------------------------------------------------------------- driving

def build(dest, source_dir, workers, expected=FULL_SET):
    zip_paths = locate_zips(source_dir)
    images_by_zip = {path: list_images(path) for path in zip_paths}
    check_alphabets_disjoint(images_by_zip)
    partial = partial_folder(dest)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        convert_all(images_by_zip, partial, workers)
        survey = survey_folder(partial, expected)
        if not survey.complete:
            raise PrepareError(
                f'the zips in {source_dir} are not the Omniglot set: '
                f'{survey.describe()}; download the official zips from '
                f'{URL_BASE}')
        move_into_place(partial, dest, expected)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return survey


def download_zips(download_dir, fetch, log):
    for zip_name in ZIP_NAMES:
        url = zip_url(zip_name)
        log(f'downloading {url}')
        try:
            fetch(url, str(Path(download_dir) / zip_name))
        except OSError as error:  # URLError and HTTPError are OSErrors
            raise PrepareError(
                f'could not download {url} ({error}); check the network, or '
                'download both zips by hand and run with --from DIR') from None
        check_download(Path(download_dir) / zip_name, url)


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as file:
        for block in iter(lambda: file.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def check_download(path, url):
    """A downloaded zip must be the official one (its pinned sha256)."""
    got = sha256_of(path)
    if got != ZIP_SHA256[path.name]:
        raise PrepareError(
            f'{url} downloaded with sha256 {got[:16]}..., not the official '
            f'{ZIP_SHA256[path.name][:16]}...; download it again, or by hand '
            'and run with --from DIR')


def check_existing(dest, expected=FULL_SET):
    """Survey of a complete dest, None if there is nothing there yet."""
    if not dest.exists():
        return None
    if not dest.is_dir():
        raise PrepareError(f'{dest} exists and is not a folder; remove it or '
                           'choose another --to')
    if not any(dest.iterdir()):
        dest.rmdir()
        return None
    survey = survey_folder(dest, expected)
    if survey.complete:
        return survey
    raise PrepareError(
        f'{dest} exists but is not complete Omniglot ({survey.describe()}); '
        'remove it and rerun, or choose another --to')


def prepare(dest=DEFAULT_DEST, source_dir=None,
            fetch=urllib.request.urlretrieve, workers=2, log=print,
            expected=FULL_SET):
    """Make dest hold the 28x28 Omniglot set; returns (Survey, was_ready).

    source_dir holds the two zips; without it they are downloaded with
    fetch(url, filename) into a temporary folder and checked against
    their pinned checksums. `expected`: the counts to find (the full set;
    tests prepare a subset).
    """
    dest = Path(dest).absolute()
    remove_stale_partials(dest)
    existing = check_existing(dest, expected)
    if existing is not None:
        return existing, True
    if source_dir is not None:
        return build(dest, source_dir, workers, expected), False
    with tempfile.TemporaryDirectory(prefix='omniglot-download-') as tmp:
        download_zips(tmp, fetch, log)
        return build(dest, tmp, workers, expected), False


def display_path(path):
    relative = os.path.relpath(path)
    return str(path) if relative.startswith('..') else relative


def summary_line(survey, dest, was_ready):
    size = f'{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}'
    line = f'omniglot ready: {survey.counts()} ({size})'
    line += f' in {display_path(dest)}'
    return line + (' (already prepared, nothing redone)' if was_ready else '')


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description='Download/unzip Omniglot and resize it to 28x28.')
    parser.add_argument(
        '--from', dest='source_dir', type=Path, metavar='DIR',
        help=f'folder holding {" and ".join(ZIP_NAMES)} '
             '(default: download them)')
    parser.add_argument(
        '--to', dest='dest', type=Path, default=DEFAULT_DEST, metavar='OUT',
        help='output folder (default: data/omniglot_resized in the repo)')
    parser.add_argument('--workers', type=int, default=2,
                        help='processes resizing images (default: 2)')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        survey, was_ready = prepare(args.dest, args.source_dir,
                                    workers=args.workers)
    except PrepareError as error:
        print(f'error: {error}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print('error: interrupted; nothing half-done was kept, rerun to '
              'start over', file=sys.stderr)
        return 130
    print(summary_line(survey, Path(args.dest).absolute(), was_ready))
    return 0


if __name__ == '__main__':
    sys.exit(main())
