"""Tests for data/prepare_miniimagenet.py on small synthetic stand-ins."""

import csv
import importlib.util
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SCRIPT = REPO / "data" / "prepare_miniimagenet.py"
sys.path.insert(0, str(TESTS))

import standin  # noqa: E402
from tests.conftest import sigint_as_in_a_terminal  # noqa: E402


def load_script_module():
    spec = importlib.util.spec_from_file_location("prepare_miniimagenet", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


prep = load_script_module()

SMALL = dict(classes=(5, 5, 5), images_per_class=4)
NOTE = "(note: not the standard 64/16/20 classes x 600 images split)"


def run_script(source, out, *extra):
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--from", str(source), "--to", str(out), *extra],
        cwd=REPO, capture_output=True, text=True, timeout=120)


def csv_rows(source, split):
    with open(source / f"{split}.csv", newline="") as f:
        return list(csv.reader(f))[1:]


def write_rows(source, split, rows, header=("filename", "label")):
    with open(source / f"{split}.csv", "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([header, *rows])


def leftovers(out):
    """Anything named like the output folder or one of its partial builds."""
    return sorted(p.name for p in out.parent.glob(out.name + "*"))


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def small_source(tmp_path_factory):
    return standin.make_miniimagenet_source(tmp_path_factory.mktemp("small") / "raw", **SMALL)


@pytest.fixture(scope="module")
def small_run(small_source, tmp_path_factory):
    out = tmp_path_factory.mktemp("small_out") / "miniImagenet"
    result = run_script(small_source, out)
    assert result.returncode == 0, result.stderr
    return out, result


@pytest.fixture(scope="module")
def default_source(tmp_path_factory):
    """The stand-in's default size, 20 classes x 25 images per split."""
    return standin.make_miniimagenet_source(tmp_path_factory.mktemp("default") / "raw")


# ------------------------------------------------------------ happy path


def test_layout_matches_csv_files(small_source, small_run):
    out, _ = small_run
    for split in prep.SPLITS:
        expected = {(label, name) for name, label in csv_rows(small_source, split)}
        written = {(p.parent.name, p.name) for p in (out / split).glob("*/*")}
        assert written == expected
    assert sorted(p.name for p in out.iterdir()) == ["test", "train", "val"]


def test_every_image_is_84x84_rgb_jpeg(small_run):
    out, _ = small_run
    files = list(out.glob("*/*/*.jpg"))
    assert len(files) == 3 * 5 * 4
    for file in files:
        with Image.open(file) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (84, 84))


def test_pixels_equal_pil_lanczos_of_source(small_source, small_run):
    out, _ = small_run
    name, label = csv_rows(small_source, "train")[2]  # third size: 130x200
    with Image.open(small_source / "images" / name) as source_image:
        assert source_image.size == (130, 200)
        lanczos = source_image.convert("RGB").resize((84, 84), Image.LANCZOS)
    buffer = io.BytesIO()
    lanczos.save(buffer, "JPEG", quality=prep.JPEG_QUALITY)
    written = np.asarray(Image.open(out / "train" / label / name))
    assert np.array_equal(written, np.asarray(Image.open(buffer)))
    # Exact against the same pipeline; against the raw resize only JPEG loss,
    # which is a few levels on the stand-in's noisy pixels.
    jpeg_error = np.abs(written.astype(int) - np.asarray(lanczos, dtype=int)).mean()
    assert jpeg_error < 8


def test_report_line_for_non_standard_set(small_run):
    out, result = small_run
    assert result.stdout.splitlines()[-1] == (
        "miniImagenet ready: train 5 classes x 4 images, val 5 classes x 4 images, "
        f"test 5 classes x 4 images (84x84) in {out} {NOTE}")
    assert result.stderr == ""


def test_report_line_for_standard_set(monkeypatch):
    summary = {split: {f"n{split}{i}": 600 for i in range(count)}
               for split, count in prep.STANDARD_CLASSES.items()}
    monkeypatch.chdir(REPO)
    assert prep.describe(summary, REPO / "data" / "miniImagenet") == (
        "train 64 classes, val 16, test 20, 600 images each (84x84) in data/miniImagenet")


def test_default_output_is_repo_data_folder():
    assert prep.parse_args(["--from", "somewhere"]).out == REPO / "data" / "miniImagenet"


def test_default_size_stand_in(default_source, tmp_path):
    out = tmp_path / "miniImagenet"
    result = run_script(default_source, out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == (
        "miniImagenet ready: train 20 classes x 25 images, val 20 classes x 25 images, "
        f"test 20 classes x 25 images (84x84) in {out} {NOTE}")
    assert len(list(out.glob("*/*/*.jpg"))) == 1500
    assert leftovers(out) == ["miniImagenet"]


def test_rerun_is_a_fast_no_op(small_source, small_run):
    out, _ = small_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    result = run_script(small_source, out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "miniImagenet already prepared: train 5 classes x 4 images, val 5 classes x 4 images, "
        f"test 5 classes x 4 images (84x84) in {out} {NOTE}"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_grayscale_and_cmyk_sources_become_rgb(tmp_path):
    source = standin.make_miniimagenet_source(tmp_path / "raw", classes=(1, 1, 1), images_per_class=2)
    gray_name, gray_label = csv_rows(source, "train")[0]
    cmyk_name, cmyk_label = csv_rows(source, "val")[0]
    for name, mode in [(gray_name, "L"), (cmyk_name, "CMYK")]:
        path = source / "images" / name
        Image.open(path).convert(mode).save(path, "JPEG")
    out = tmp_path / "out"
    assert prep.prepare(source, out, workers=1)[0] == "ready"
    for path in [out / "train" / gray_label / gray_name, out / "val" / cmyk_label / cmyk_name]:
        assert Image.open(path).mode == "RGB"


def test_empty_output_folder_is_filled(small_source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    result = run_script(small_source, out)
    assert result.returncode == 0, result.stderr
    assert "miniImagenet ready:" in result.stdout


# ---------------------------------------------------------- interruptions


def test_interrupted_build_leaves_nothing(small_source, tmp_path, monkeypatch):
    calls = []

    def resize_then_interrupt(source_file, target_file):
        calls.append(source_file)
        if len(calls) == 5:
            raise KeyboardInterrupt
        real_resize(source_file, target_file)

    real_resize = prep.resize_image
    monkeypatch.setattr(prep, "resize_image", resize_then_interrupt)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(small_source, out, workers=1)
    assert leftovers(out) == []


def start_and_wait_for_partial(source, out):
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--from", str(source), "--to", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=sigint_as_in_a_terminal)
    deadline = time.monotonic() + 30
    while not list(out.parent.glob(out.name + ".partial-*/*")):
        assert process.poll() is None, "finished before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    return process


def test_killed_run_leaves_no_complete_looking_output(default_source, tmp_path):
    out = tmp_path / "out"
    process = start_and_wait_for_partial(default_source, out)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    assert not out.exists()
    assert all(name.startswith("out.partial-") for name in leftovers(out))


def test_ctrl_c_cleans_up_without_traceback(default_source, tmp_path):
    out = tmp_path / "out"
    process = start_and_wait_for_partial(default_source, out)
    os.killpg(process.pid, signal.SIGINT)  # like Ctrl-C: the whole process group
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130
    assert stderr.startswith("error: interrupted") and "Traceback" not in stderr
    assert leftovers(out) == []


def test_stale_partial_is_removed_by_next_run(small_source, tmp_path):
    out = tmp_path / "out"
    stale = standin.make_miniimagenet_prepared(tmp_path / "out.partial-killed", classes=(1, 1, 1),
                                               images_per_class=1)
    result = run_script(small_source, out)
    assert result.returncode == 0, result.stderr
    assert not stale.exists() and leftovers(out) == ["out"]
    assert len(list(out.glob("*/*/*.jpg"))) == 60


# -------------------------------------------------------------------- errors


def remove_images(source, count):
    names = [name for name, _ in csv_rows(source, "test")[-count:]]
    for name in names:
        (source / "images" / name).unlink()
    return names


def corrupt_first_image(source, content):
    name = csv_rows(source, "val")[0][0]
    path = source / "images" / name
    path.write_bytes(content(path.read_bytes()))
    return [name]


def duplicate_within_csv(source):
    rows = csv_rows(source, "train")
    write_rows(source, "train", rows + [rows[1]])
    return [rows[1][0], "train.csv line 3", "train.csv line 10"]


def duplicate_across_csvs(source):
    train_name = csv_rows(source, "train")[0][0]
    rows = csv_rows(source, "val")
    write_rows(source, "val", rows + [[train_name, rows[0][1]]])
    return [train_name, "train.csv line 2", "val.csv line 10"]


def class_in_two_splits(source):
    train_label = csv_rows(source, "train")[0][1]
    shutil.copy(source / "images" / csv_rows(source, "train")[0][0], source / "images" / "extra.jpg")
    write_rows(source, "test", csv_rows(source, "test") + [["extra.jpg", train_label]])
    return [train_label, "train, test"]


def empty_label(source):
    rows = csv_rows(source, "test")
    rows[2][1] = ""
    write_rows(source, "test", rows)
    return [rows[2][0], "test.csv line 4", "empty label"]


def bad_header(source):
    write_rows(source, "train", csv_rows(source, "train"), header=("file", "class"))
    return ["train.csv", "'file,class'", "filename,label"]


ERROR_CASES = {
    "missing source folder": lambda s: shutil.rmtree(s) or [str(s.resolve()), "--from"],
    "missing images folder": lambda s: shutil.rmtree(s / "images") or ["images/"],
    "missing csv file": lambda s: (s / "val.csv").unlink() or ["val.csv"],
    "bad csv header": bad_header,
    "missing images": lambda s: ["2 images", *remove_images(s, 2)],
    "many missing images": lambda s: ["5 images", "and 2 more", *remove_images(s, 5)[:3]],
    "empty label": empty_label,
    "duplicate within a csv": duplicate_within_csv,
    "duplicate across csvs": duplicate_across_csvs,
    "class in two splits": class_in_two_splits,
    "corrupt image": lambda s: corrupt_first_image(s, lambda data: b"not a jpeg"),
    "truncated image": lambda s: corrupt_first_image(s, lambda data: data[:len(data) // 3]),
    "output not a prepared set": lambda s: (s.parent / "out").mkdir() or
                                           (s.parent / "out" / "notes.txt").touch() or ["out", "--to"],
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_error_is_one_clear_line(case, tmp_path):
    source = standin.make_miniimagenet_source(tmp_path / "raw", classes=(2, 2, 2), images_per_class=4,
                                              sizes=((90, 90),))
    expected_words = ERROR_CASES[case](source)
    out = tmp_path / "out"
    had_out = out.exists()
    result = run_script(source, out)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in expected_words:
        assert word in lines[0]
    assert leftovers(out) == (["out"] if had_out else [])


def test_csv_problems_are_found_before_any_resizing(small_source, tmp_path, monkeypatch):
    source = tmp_path / "raw"
    shutil.copytree(small_source, source)
    remove_images(source, 1)  # the very last row of the last csv
    monkeypatch.setattr(prep, "resize_image", lambda *args: pytest.fail("resized before validating"))
    with pytest.raises(prep.PrepareError, match="missing from"):
        prep.prepare(source, tmp_path / "out", workers=1)
