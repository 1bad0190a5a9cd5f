"""Turn a raw MiniImagenet download into the folder layout the MAML code loads.

The Ravi & Larochelle split cannot be redistributed, so bring a folder DIR with
`images/*.jpg` (full-size ImageNet images) and `train.csv`, `val.csv`,
`test.csv` (header `filename,label`), then run

    python data/prepare_miniimagenet.py --from DIR [--to data/miniImagenet]

to get `OUT/{train,val,test}/LABEL/*.jpg`, every image 84x84 RGB.  The result
is built in a temporary sibling folder and renamed into place only once it has
been checked, so an existing OUT is always complete and a rerun is a no-op
(delete OUT to rebuild it).
"""

import argparse
import csv
import multiprocessing
import os
import shutil
import signal
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "data" / "miniImagenet"
SPLITS = ("train", "val", "test")
CSV_HEADER = ["filename", "label"]
IMAGE_SIZE = 84
# Fixed so that reruns and tests reproduce the exact same bytes; 75 is PIL's
# default, which is what the original proc_images.py used.
JPEG_QUALITY = 75
STANDARD_CLASSES = {"train": 64, "val": 16, "test": 20}
STANDARD_IMAGES_PER_CLASS = 600
SHOWN_ITEMS = 3
PROGRESS_EVERY = 5000

# split -> label -> number of images
Summary = Dict[str, Dict[str, int]]


class PrepareError(Exception):
    """A problem the user has to fix; main() prints it as one line."""


class Row(NamedTuple):
    split: str
    line: int
    filename: str
    label: str

    def where(self) -> str:
        return f"{self.split}.csv line {self.line}"


def some(items: Sequence[str]) -> str:
    """'a, b, c' or 'a, b, c and 7 more' -- keeps error lines short."""
    items = list(items)
    shown = ", ".join(items[:SHOWN_ITEMS])
    rest = len(items) - SHOWN_ITEMS
    return f"{shown} and {rest} more" if rest > 0 else shown


def plural(count: int, word: str, words: str = "") -> str:
    return f"{count} {word}" if count == 1 else f"{count} {words or word + 's'}"


# ---------------------------------------------------------------- source checks


def read_source(source: Path) -> Dict[str, List[Row]]:
    """Read and cross-check the csv files; touches no image content."""
    check_source_folder(source)
    rows_by_split = {split: read_csv(source / f"{split}.csv", split) for split in SPLITS}
    all_rows = [row for rows in rows_by_split.values() for row in rows]
    check_labels_present(all_rows)
    check_unique_filenames(all_rows)
    check_classes_in_one_split(all_rows)
    check_images_exist(all_rows, source / "images")
    return rows_by_split


def check_source_folder(source: Path) -> None:
    if not source.is_dir():
        raise PrepareError(
            f"source folder {source} not found; pass --from the folder that holds "
            "images/ and train.csv, val.csv, test.csv")
    if not (source / "images").is_dir():
        raise PrepareError(
            f"{source} has no images/ folder; put the MiniImagenet jpg files in {source / 'images'}")
    missing = [f"{split}.csv" for split in SPLITS if not (source / f"{split}.csv").is_file()]
    if missing:
        raise PrepareError(
            f"{source} is missing {some(missing)}; add the Ravi & Larochelle split files "
            "(header 'filename,label')")


def read_csv(path: Path, split: str) -> List[Row]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            lines = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as error:
        raise PrepareError(f"{path} is not a readable csv file ({error}); "
                           "it must be text with 'filename,label' rows") from None
    header = [cell.strip() for cell in lines[0]] if lines else []
    if header != CSV_HEADER:
        raise PrepareError(
            f"{path} has header {','.join(header)!r}, expected 'filename,label'; "
            "fix the first line of the file")
    rows, malformed = [], []
    for line_number, cells in enumerate(lines[1:], start=2):
        if not any(cell.strip() for cell in cells):
            continue  # blank line
        if len(cells) != 2 or not is_plain_name(cells[0].strip()) or "/" in cells[1]:
            malformed.append(f"line {line_number}")
            continue
        rows.append(Row(split, line_number, cells[0].strip(), cells[1].strip()))
    if malformed:
        raise PrepareError(
            f"{path} has {plural(len(malformed), 'malformed row')}: {some(malformed)}; "
            "each row must be 'filename,label' with a bare file name")
    if not rows:
        raise PrepareError(f"{path} lists no images; add 'filename,label' rows")
    return rows


def is_plain_name(filename: str) -> bool:
    return bool(filename) and filename not in (".", "..") and "/" not in filename and "\\" not in filename


def check_labels_present(rows: List[Row]) -> None:
    unlabeled = [f"{row.filename} ({row.where()})" for row in rows if not row.label]
    if unlabeled:
        raise PrepareError(
            f"{plural(len(unlabeled), 'row')} with an empty label: {some(unlabeled)}; "
            "give every row its class label")


def check_unique_filenames(rows: List[Row]) -> None:
    places = defaultdict(list)
    for row in rows:
        places[row.filename].append(row.where())
    duplicates = [f"{name} ({', '.join(where)})" for name, where in places.items() if len(where) > 1]
    if duplicates:
        raise PrepareError(
            f"{plural(len(duplicates), 'file name')} listed more than once: {some(duplicates)}; "
            "list each image in exactly one row")


def check_classes_in_one_split(rows: List[Row]) -> None:
    splits_of = defaultdict(set)
    for row in rows:
        splits_of[row.label].add(row.split)
    shared = [f"{label} ({', '.join(s for s in SPLITS if s in splits)})"
              for label, splits in splits_of.items() if len(splits) > 1]
    if shared:
        raise PrepareError(
            f"{plural(len(shared), 'class', 'classes')} in more than one split: {some(shared)}; "
            "each class must belong to exactly one of train/val/test")


def check_images_exist(rows: List[Row], images: Path) -> None:
    present = set(os.listdir(images))
    missing = [row.filename for row in rows if row.filename not in present]
    if missing:
        raise PrepareError(
            f"{plural(len(missing), 'image')} listed in the csv files missing from {images}: "
            f"{some(missing)}; copy them into images/ or remove their rows")


# ------------------------------------------------------------------- resizing


def resize_image(source_file: Path, target_file: Path) -> None:
    with Image.open(source_file) as image:
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        small = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), resample=Image.LANCZOS)
    small.save(target_file, "JPEG", quality=JPEG_QUALITY)


def resize_job(job: Tuple[str, str]) -> Optional[str]:
    """Pool worker: returns a description of the failure, or None."""
    source_file, target_file = job
    try:
        resize_image(Path(source_file), Path(target_file))
    except Exception as error:  # PIL raises many types for corrupt data; report, don't crash
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        reason = reason.replace(f" '{source_file}'", "")  # the name is shown already
        return f"{Path(source_file).name} ({reason})"
    return None


def resize_all(rows_by_split: Dict[str, List[Row]], source: Path, target: Path, workers: int) -> None:
    jobs = []
    for split, rows in rows_by_split.items():
        for label in sorted({row.label for row in rows}):
            (target / split / label).mkdir(parents=True)
        jobs += [(str(source / "images" / row.filename), str(target / split / row.label / row.filename))
                 for row in rows]
    print(f"resizing {len(jobs)} images to {IMAGE_SIZE}x{IMAGE_SIZE} with {plural(workers, 'worker')}",
          flush=True)
    failures = [failure for failure in run_jobs(jobs, workers) if failure]
    if failures:
        raise PrepareError(
            f"{plural(len(failures), 'image')} in {source / 'images'} could not be read: "
            f"{some(failures)}; replace each with a valid image file")


def run_jobs(jobs: List[Tuple[str, str]], workers: int):
    if workers <= 1:
        results = map(resize_job, jobs)
        yield from report_progress(results, len(jobs))
        return
    with multiprocessing.Pool(workers, initializer=ignore_interrupts) as pool:
        results = pool.imap_unordered(resize_job, jobs, chunksize=64)
        yield from report_progress(results, len(jobs))


def ignore_interrupts() -> None:
    # Ctrl-C reaches the whole process group; let only the parent handle it,
    # so workers don't each print a KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def report_progress(results, total: int):
    for done, result in enumerate(results, start=1):
        if done % PROGRESS_EVERY == 0 and done < total:
            print(f"  {done}/{total} images", flush=True)
        yield result


# ----------------------------------------------------------- prepared folder


def inspect_prepared(root: Path, every_image: bool) -> Summary:
    """Check a prepared tree and count it; raises PrepareError if incomplete.

    Without every_image only the first image of each class is opened, which is
    enough for a folder this script renamed into place after a full check.
    """
    missing = [split for split in SPLITS if not (root / split).is_dir()]
    if missing:
        raise PrepareError(f"{root} has no {some(missing)} folder")
    summary: Summary = {}
    for split in SPLITS:
        summary[split] = count_classes(root / split)
    check_prepared_classes_disjoint(root, summary)
    for split, classes in summary.items():
        for label in classes:
            files = image_files(root / split / label)
            check_image_sizes(files if every_image else files[:1])
    return summary


def count_classes(split_folder: Path) -> Dict[str, int]:
    classes = {entry.name: len(image_files(entry))
               for entry in sorted(split_folder.iterdir()) if entry.is_dir()}
    if not classes:
        raise PrepareError(f"{split_folder} has no class folders")
    empty = [label for label, count in classes.items() if count == 0]
    if empty:
        raise PrepareError(f"{split_folder} has {plural(len(empty), 'empty class folder')}: {some(empty)}")
    return classes


def image_files(folder: Path) -> List[Path]:
    with os.scandir(folder) as entries:
        return sorted(Path(entry.path) for entry in entries
                      if entry.is_file() and not entry.name.startswith("."))


def check_prepared_classes_disjoint(root: Path, summary: Summary) -> None:
    counts = Counter(label for classes in summary.values() for label in classes)
    shared = [label for label, count in counts.items() if count > 1]
    if shared:
        raise PrepareError(f"{root} has {plural(len(shared), 'class', 'classes')} in more than one split: {some(shared)}")


def check_image_sizes(files: List[Path]) -> None:
    for file in files:
        try:
            with Image.open(file) as image:
                size, mode = image.size, image.mode
        except OSError as error:
            raise PrepareError(f"{file} is unreadable ({error})") from None
        if size != (IMAGE_SIZE, IMAGE_SIZE) or mode != "RGB":
            raise PrepareError(f"{file} is {size[0]}x{size[1]} {mode}, expected {IMAGE_SIZE}x{IMAGE_SIZE} RGB")


def check_matches_source(summary: Summary, rows_by_split: Dict[str, List[Row]]) -> None:
    for split, rows in rows_by_split.items():
        if summary[split] != dict(Counter(row.label for row in rows)):
            raise PrepareError(f"the {split} images written do not match {split}.csv")


# ------------------------------------------------------------------ top level


def prepare(source: Path, out: Path, workers: int = 2) -> Tuple[str, Summary]:
    """Build `out` from `source`; returns ('ready' | 'already prepared', summary)."""
    source, out = source.resolve(), out.resolve()
    if out == source:
        raise PrepareError(f"--to {out} is the source folder; write the prepared set somewhere else")
    existing = existing_result(out)
    if existing is not None:
        return "already prepared", existing
    rows_by_split = read_source(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    # Not tempfile.mkdtemp: its 0700 mode would stick to the renamed OUT.
    partial = out.parent / f"{out.name}.partial-{os.getpid()}"
    partial.mkdir()
    try:
        resize_all(rows_by_split, source, partial, workers)
        summary = inspect_prepared(partial, every_image=True)
        check_matches_source(summary, rows_by_split)
        if out.is_dir():
            out.rmdir()  # existing_result() let it through only if empty
        partial.rename(out)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    return "ready", summary


def existing_result(out: Path) -> Optional[Summary]:
    """Summary of a finished `out`, None if there is nothing (or an empty folder) there."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    try:
        return inspect_prepared(out, every_image=False)
    except PrepareError as problem:
        raise PrepareError(
            f"{out} already exists but is not a prepared miniImagenet ({problem}); "
            "remove it or choose another --to") from None


def remove_stale_partials(out: Path) -> None:
    # Left behind by a killed run; nothing ever reads them.  (Two runs writing
    # the same OUT at once are not supported.)
    for stale in out.parent.glob(f"{out.name}.partial-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def describe(summary: Summary, out: Path) -> str:
    """The one-line report, e.g. 'train 64 classes, val 16, test 20, 600 images each (84x84) in OUT'."""
    class_counts = {split: len(classes) for split, classes in summary.items()}
    per_class = {count for classes in summary.values() for count in classes.values()}
    if class_counts == STANDARD_CLASSES and per_class == {STANDARD_IMAGES_PER_CLASS}:
        return (f"train {class_counts['train']} classes, val {class_counts['val']}, "
                f"test {class_counts['test']}, {STANDARD_IMAGES_PER_CLASS} images each "
                f"({IMAGE_SIZE}x{IMAGE_SIZE}) in {shown_path(out)}")
    parts = [f"{split} {plural(len(classes), 'class', 'classes')} x {images_range(classes)} images"
             for split, classes in summary.items()]
    return (", ".join(parts) + f" ({IMAGE_SIZE}x{IMAGE_SIZE}) in {shown_path(out)} "
            f"(note: not the standard 64/16/20 classes x {STANDARD_IMAGES_PER_CLASS} images split)")


def images_range(classes: Dict[str, int]) -> str:
    low, high = min(classes.values()), max(classes.values())
    return str(low) if low == high else f"{low}-{high}"


def shown_path(path: Path) -> str:
    relative = os.path.relpath(path)
    return path.as_posix() if relative.startswith("..") else Path(relative).as_posix()


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", required=True, type=Path,
                        help="folder with images/ and train.csv, val.csv, test.csv")
    parser.add_argument("--to", dest="out", type=Path, default=DEFAULT_OUT,
                        help=f"output folder (default: {DEFAULT_OUT.relative_to(REPO_ROOT)} in the repository)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="resizing processes (default: 2)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        status, summary = prepare(args.source, args.out, args.workers)
    except PrepareError as problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written to the output folder, rerun to start over",
              file=sys.stderr)
        return 130
    except OSError as error:  # disk full, permissions, ...: not a bug, so no traceback
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"miniImagenet {status}: {describe(summary, args.out.resolve())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
