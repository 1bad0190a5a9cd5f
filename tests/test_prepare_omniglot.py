"""Tests of data/prepare_omniglot.py and data/resize_images.py.

The real subset in tests/data/omniglot (3 alphabets in the official zips'
layout) is prepared once per session (conftest's omniglot_subset_root);
everything else uses it or tiny zips made here.  The tests that need the
full set (its counts, the download of the official files, Ctrl-C and kill
of a full preparation) run where it is given (see conftest).  Nothing is
downloaded.
"""
import io
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'data'))
import prepare_omniglot as po  # noqa: E402
import resize_images  # noqa: E402
from tests.conftest import OMNIGLOT_SUBSET, OMNIGLOT_SUBSET_ZIPS as SUBSET_ZIPS, sigint_as_in_a_terminal  # noqa: E402

OFFICIAL_URLS = [
    'https://github.com/brendenlake/omniglot/raw/master/python/'
    'images_background.zip',
    'https://github.com/brendenlake/omniglot/raw/master/python/'
    'images_evaluation.zip',
]
DEAD_PID = 999_999_999  # above any Linux pid_max

@pytest.fixture(scope='module')
def prepared(omniglot_subset_root):
    return omniglot_subset_root


def image_paths(root):
    return sorted(Path(root).glob('*/*/*.png'))


def lanczos_of_member(zip_path, member):
    with zipfile.ZipFile(zip_path) as archive:
        original = Image.open(io.BytesIO(archive.read(member)))
        return original.resize((28, 28), resample=Image.LANCZOS)


def png_bytes(size=(105, 105), mode='1'):
    buffer = io.BytesIO()
    Image.new(mode, size, 1).save(buffer, format='PNG')
    return buffer.getvalue()


def make_zips(folder, background_members, evaluation_members=None):
    """Write images_background.zip/images_evaluation.zip; members map
    name -> bytes (or a ZipInfo -> bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    default = {'images_evaluation/Zeta/character01/0001_01.png': png_bytes()}
    for name, members in [('images_background.zip', background_members),
                          ('images_evaluation.zip',
                           evaluation_members or default)]:
        with zipfile.ZipFile(folder / name, 'w') as archive:
            for member, data in members.items():
                archive.writestr(member, data)
    return folder


def run_script(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, str(REPO / 'data' / 'prepare_omniglot.py'), *args],
        cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture
def assert_clean_cli_error(one_line_error):
    """one_line_error, and stderr holds nothing else."""
    def check(result, *needles):
        one_line_error(result, *needles)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return check


# ------------------------------------------------- full preparation

def assert_complete(prepared, alphabets, characters):
    assert len([p for p in prepared.iterdir() if p.is_dir()]) == alphabets
    folders = [c for a in prepared.iterdir() if a.is_dir() for c in a.iterdir()]
    assert len(folders) == characters
    assert all(len(list(c.glob('*.png'))) == 20 for c in folders)
    paths = image_paths(prepared)
    assert len(paths) == 20 * characters
    assert all(Image.open(p).size == (28, 28) for p in paths)
    # Other tests may add main.py's image cache (.cache) beside it; no partial may remain.
    partials = [p.name for p in prepared.parent.iterdir() if p.name.startswith('omniglot_resized.')]
    assert partials == [], 'partial folder left behind'


def test_prepared_subset_is_complete(prepared):
    assert_complete(prepared, OMNIGLOT_SUBSET.alphabets, OMNIGLOT_SUBSET.characters)


def test_prepared_folder_is_complete_omniglot(omniglot_root):
    assert_complete(omniglot_root, 50, 1623)


@pytest.mark.parametrize('zip_name', po.ZIP_NAMES)
def test_images_equal_reference_lanczos_resize(prepared, zip_name):
    zip_path = SUBSET_ZIPS / zip_name
    with zipfile.ZipFile(zip_path) as archive:
        members = sorted(n for n in archive.namelist() if n.endswith('.png'))
    for member in [members[0], members[len(members) // 2], members[-1]]:
        expected = lanczos_of_member(zip_path, member)
        produced = Image.open(prepared / member.split('/', 1)[1])
        assert produced.mode == expected.mode
        assert np.array_equal(np.array(produced), np.array(expected))


def test_rerun_is_fast_noop(prepared):
    sample = image_paths(prepared)[0]
    mtime = sample.stat().st_mtime_ns
    start = time.perf_counter()
    survey, was_ready = po.prepare(prepared, source_dir=SUBSET_ZIPS, expected=OMNIGLOT_SUBSET)
    assert was_ready and survey.complete
    assert time.perf_counter() - start < 5
    assert sample.stat().st_mtime_ns == mtime


def test_cli_rerun_prints_summary(omniglot_root, monkeypatch):
    result = run_script('--to', str(omniglot_root))    # complete: nothing to download or redo
    assert result.returncode == 0, result.stderr
    monkeypatch.chdir(REPO)    # the script ran there: a folder inside the repository shows relative
    shown = po.display_path(omniglot_root)
    assert shown == (str(omniglot_root) if not omniglot_root.is_relative_to(REPO)
                     else 'data/omniglot_resized')
    assert result.stdout.strip().splitlines()[-1] == (
        'omniglot ready: 50 alphabets, 1623 characters, 32460 images (28x28) '
        f'in {shown} (already prepared, nothing redone)')


def test_cli_on_zips_that_are_not_the_full_set(tmp_path, assert_clean_cli_error):
    result = run_script('--from', str(SUBSET_ZIPS), '--to', str(tmp_path / 'omniglot_resized'))
    assert_clean_cli_error(result, 'not the Omniglot set', 'found 3 alphabets, 54 characters, 1080 images',
                           'expected 50 alphabets')
    assert list(tmp_path.iterdir()) == []


def test_a_download_that_is_not_the_official_zip_is_refused(tmp_path):
    def fake_urlretrieve(url, filename):     # serves the subset: same names, other bytes
        shutil.copy(SUBSET_ZIPS / url.rsplit('/', 1)[1], filename)

    with pytest.raises(po.PrepareError, match='images_background.zip downloaded with sha256 f4b9a779'):
        po.prepare(tmp_path / 'out', fetch=fake_urlretrieve, log=lambda line: None)
    assert list(tmp_path.iterdir()) == []


def test_download_path_uses_official_urls(tmp_path, monkeypatch, omniglot_zips):
    calls, built_from = [], []

    def fake_urlretrieve(url, filename):
        calls.append((url, filename))
        shutil.copy(omniglot_zips / url.rsplit('/', 1)[1], filename)

    def build_spy(dest, source_dir, workers, expected):
        # The build itself is what omniglot_root ran in full.
        built_from.append(Path(source_dir))
        return [po.list_images(p) for p in po.locate_zips(source_dir)]

    monkeypatch.setattr(po, 'build', build_spy)
    result, was_ready = po.prepare(tmp_path / 'out', fetch=fake_urlretrieve)
    assert [url for url, _ in calls] == OFFICIAL_URLS
    assert [Path(f) for _, f in calls] == [
        built_from[0] / name for name in po.ZIP_NAMES]
    assert [len(images) for images in result] == [19280, 13180]
    assert not was_ready
    assert not built_from[0].exists(), 'download folder kept'


def test_download_failure_is_clear_error(tmp_path):
    def offline(url, filename):
        raise OSError('no route to host')

    with pytest.raises(po.PrepareError, match='could not download .*--from'):
        po.prepare(tmp_path / 'out', fetch=offline, log=lambda line: None)
    assert not (tmp_path / 'out').exists()


def test_default_destination_is_in_repo():
    assert po.parse_args([]).dest == REPO / 'data' / 'omniglot_resized'
    assert po.parse_args([]).source_dir is None


# ------------------------------------------- interruption and reruns

def test_interrupted_run_leaves_nothing_complete_looking(tmp_path,
                                                         monkeypatch):
    converted = []
    real_convert = po.convert_image

    def convert_then_die(*args):
        if len(converted) == 100:
            raise KeyboardInterrupt
        converted.append(args)
        real_convert(*args)

    monkeypatch.setattr(po, 'convert_image', convert_then_die)
    dest = tmp_path / 'omniglot_resized'
    with pytest.raises(KeyboardInterrupt):
        po.prepare(dest, source_dir=SUBSET_ZIPS, workers=1, expected=OMNIGLOT_SUBSET)
    assert len(converted) == 100
    assert list(tmp_path.iterdir()) == []


def test_killed_run_leaves_only_a_partial_that_is_cleaned(tmp_path,
                                                          monkeypatch):
    def die(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(po, 'convert_image', die)
    # No cleanup at all, as after kill -9:
    monkeypatch.setattr(po.shutil, 'rmtree', lambda *a, **k: None)
    dest = tmp_path / 'omniglot_resized'
    with pytest.raises(KeyboardInterrupt):
        po.prepare(dest, source_dir=SUBSET_ZIPS, workers=1, expected=OMNIGLOT_SUBSET)
    monkeypatch.undo()
    assert not dest.exists()
    assert [p.name for p in tmp_path.iterdir()] == [
        f'omniglot_resized.partial-{os.getpid()}']
    po.remove_stale_partials(dest)
    assert list(tmp_path.iterdir()) == []


def start_script_and_wait_for_images(zips, dest, *args):
    """The script preparing the full set, once it has written images."""
    process = subprocess.Popen(
        [sys.executable, str(REPO / 'data' / 'prepare_omniglot.py'),
         '--from', str(zips), '--to', str(dest), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_as_in_a_terminal)
    deadline = time.monotonic() + 60
    while not list(dest.parent.glob('*.partial-*/*/*/*.png')):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    return process


def test_ctrl_c_midway_cleans_up(tmp_path, omniglot_zips):
    dest = tmp_path / 'omniglot_resized'
    process = start_script_and_wait_for_images(omniglot_zips, dest)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert stderr.strip().startswith('error: interrupted')
    assert 'Traceback' not in stderr
    assert list(tmp_path.iterdir()) == []


def test_kill_midway_leaves_no_complete_looking_folder(tmp_path, omniglot_zips):
    dest = tmp_path / 'omniglot_resized'
    process = start_script_and_wait_for_images(omniglot_zips, dest, '--workers', '1')
    process.kill()
    process.communicate(timeout=60)
    assert not dest.exists()
    assert [p.name for p in tmp_path.iterdir()] == [
        f'omniglot_resized.partial-{process.pid}']
    po.remove_stale_partials(dest)  # what the next run does first
    assert list(tmp_path.iterdir()) == []


def test_stale_partials_of_dead_runs_are_removed(prepared):
    stale = prepared.parent / f'{prepared.name}.partial-{DEAD_PID}'
    running = prepared.parent / f'{prepared.name}.partial-{os.getppid()}'
    for partial in (stale, running):
        (partial / 'Alphabet' / 'character01').mkdir(parents=True)
    survey, was_ready = po.prepare(prepared, source_dir=SUBSET_ZIPS, expected=OMNIGLOT_SUBSET)
    assert was_ready
    assert not stale.exists()
    assert running.exists(), 'partial of a live process must be kept'
    shutil.rmtree(running)


def test_incomplete_existing_destination_is_refused(tmp_path):
    dest = tmp_path / 'omniglot_resized'
    (dest / 'Latin' / 'character01').mkdir(parents=True)
    with pytest.raises(po.PrepareError, match='exists but is not complete'):
        po.prepare(dest, source_dir=tmp_path)
    assert (dest / 'Latin' / 'character01').is_dir(), 'user data deleted'


# --------------------------------------------------------- bad input

def symlink_member(name):
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize('member', [
    'images_background/../../evil.png',
    '/tmp/evil.png',
    symlink_member('images_background/Latin/character01/0001_01.png'),
], ids=['dotdot', 'absolute', 'symlink'])
def test_zip_slip_members_are_refused(tmp_path, member):
    source = make_zips(tmp_path / 'zips',
                       {'images_background/A/c/1.png': png_bytes()})
    link_target = b'/etc/passwd'
    with zipfile.ZipFile(source / 'images_background.zip', 'a') as archive:
        archive.writestr(member, link_target if isinstance(
            member, zipfile.ZipInfo) else png_bytes())
    dest = tmp_path / 'out' / 'omniglot_resized'
    with pytest.raises(po.PrepareError,
                       match='refusing .*(outside the target|symbolic link)'):
        po.prepare(dest, source_dir=source, workers=1)
    assert not dest.exists()
    assert not list(tmp_path.rglob('evil.png'))


def test_missing_zip_cli_error(tmp_path, assert_clean_cli_error):
    make_zips(tmp_path, {'images_background/A/c/1.png': png_bytes()})
    (tmp_path / 'images_evaluation.zip').unlink()
    result = run_script('--from', str(tmp_path), '--to', str(tmp_path / 'o'))
    assert_clean_cli_error(result, 'images_evaluation.zip not found',
                           OFFICIAL_URLS[1], 'without --from')


def test_missing_folder_cli_error(tmp_path, assert_clean_cli_error):
    result = run_script('--from', str(tmp_path / 'nope'),
                        '--to', str(tmp_path / 'o'))
    assert_clean_cli_error(result, 'does not exist')


def test_corrupt_zip_cli_error(tmp_path, assert_clean_cli_error):
    make_zips(tmp_path, {'images_background/A/c/1.png': png_bytes()})
    (tmp_path / 'images_background.zip').write_bytes(b'not a zip' * 100)
    result = run_script('--from', str(tmp_path), '--to', str(tmp_path / 'o'))
    assert_clean_cli_error(result, 'not a readable zip file',
                           OFFICIAL_URLS[0])
    assert not (tmp_path / 'o').exists()


def test_unreadable_image_cli_error(tmp_path, assert_clean_cli_error):
    members = {f'images_background/A/c/{i}.png': png_bytes()
               for i in range(5)}
    members['images_background/A/c/broken.png'] = b'\x89PNG garbage'
    make_zips(tmp_path, members)
    result = run_script('--from', str(tmp_path), '--to', str(tmp_path / 'o'))
    assert_clean_cli_error(result, 'cannot read image',
                           'images_background/A/c/broken.png')
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith('o')] \
        == []


def test_zips_with_other_content_say_what_they_hold(tmp_path):
    make_zips(tmp_path, {f'images_background/A/c{c}/{i}.png': png_bytes()
                         for c in range(2) for i in range(20)})
    with pytest.raises(po.PrepareError) as error:
        po.prepare(tmp_path / 'out', source_dir=tmp_path, workers=1)
    message = str(error.value)
    assert 'found 2 alphabets, 3 characters, 41 images' in message
    assert 'expected 50 alphabets' in message
    assert 'Zeta/character01 has 1' in message
    assert not (tmp_path / 'out').exists()


def test_zip_without_omniglot_layout(tmp_path):
    make_zips(tmp_path, {'readme.txt': b'hello'})
    with pytest.raises(po.PrepareError, match='holds no images laid out as'):
        po.prepare(tmp_path / 'out', source_dir=tmp_path, workers=1)


# ------------------------------------------------ manual resize route

def test_manual_resize_route_matches_prepare(tmp_path, prepared):
    manual = tmp_path / 'omniglot_resized'
    with zipfile.ZipFile(SUBSET_ZIPS / 'images_background.zip') as archive:
        members = sorted(n for n in archive.namelist() if n.endswith('.png'))
        for member in members[:45]:  # a few character folders
            target = manual / member.split('/', 1)[1]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(member))
    script = str(REPO / 'data' / 'resize_images.py')

    first = subprocess.run([sys.executable, script], cwd=manual,
                           capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert 'resized 45 images' in first.stdout
    for path in image_paths(manual):
        relative = path.relative_to(manual)
        assert np.array_equal(np.array(Image.open(path)),
                              np.array(Image.open(prepared / relative)))

    second = subprocess.run([sys.executable, script], cwd=manual,
                            capture_output=True, text=True, timeout=60)
    assert 'resized 0 images' in second.stdout and '45 already' in \
        second.stdout


def test_manual_resize_route_in_empty_folder_errors(tmp_path, assert_clean_cli_error):
    result = subprocess.run(
        [sys.executable, str(REPO / 'data' / 'resize_images.py')],
        cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert_clean_cli_error(result, 'no */*/*.png images here')
