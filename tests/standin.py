"""Small synthetic stand-ins for MiniImagenet (the real set cannot be shipped).

Plain functions, no pytest, so benchmarks can use them too.  Labels look like
the real WordNet ids (`n00000007`) and file names like the real ones
(`<label><8-digit index>.jpg`); every class belongs to exactly one split.
"""

import csv
import io
from pathlib import Path
from typing import Iterator, Sequence, Tuple

import numpy as np
from PIL import Image

SPLITS = ("train", "val", "test")
Size = Tuple[int, int]  # (width, height), as PIL uses it


def split_labels(classes: Sequence[int]) -> Iterator[Tuple[str, list]]:
    """Yields (split, labels) with labels numbered across splits, so never shared."""
    first = 0
    for split, count in zip(SPLITS, classes):
        yield split, [f"n{index:08d}" for index in range(first, first + count)]
        first += count


def image_name(label: str, index: int) -> str:
    return f"{label}{index + 1:08d}.jpg"


def random_image(rng: np.random.Generator, size: Size) -> Image.Image:
    """Blocky colour blobs plus a little noise: varied content, small JPEGs, cheap to make."""
    width, height = size
    blobs = rng.integers(0, 224, (4, 4, 3), dtype=np.uint8)
    base = np.repeat(np.repeat(blobs, -(-height // 4), axis=0), -(-width // 4), axis=1)[:height, :width]
    noise = np.frombuffer(rng.bytes(height * width * 3), dtype=np.uint8).reshape(height, width, 3) & 31
    return Image.fromarray(base + noise)  # at most 223 + 31: no uint8 overflow


def make_miniimagenet_source(root, classes=(20, 20, 20), images_per_class=25,
                             sizes: Sequence[Size] = ((100, 90), (84, 84), (130, 200)),
                             seed=0) -> Path:
    """Write a raw download look-alike: root/images/*.jpg and root/{train,val,test}.csv."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    made = 0
    for split, labels in split_labels(classes):
        rows = []
        for label in labels:
            for index in range(images_per_class):
                name = image_name(label, index)
                random_image(rng, sizes[made % len(sizes)]).save(root / "images" / name, "JPEG", quality=90)
                rows.append((name, label))
                made += 1
        write_csv(root / f"{split}.csv", rows)
    return root


def write_csv(path: Path, rows) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["filename", "label"])
        writer.writerows(rows)


def make_miniimagenet_prepared(root, classes=(20, 20, 20), images_per_class=25, size=84,
                               seed=0) -> Path:
    """Write an already-prepared root/{train,val,test}/LABEL/*.jpg tree of size x size JPEGs.

    Every image is distinct.  The real shape (64/16/20 classes x 600 images)
    takes roughly 15-30 s, mostly creating the 60,000 files.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, labels in split_labels(classes):
        for label in labels:
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(images_per_class):
                (folder / image_name(label, index)).write_bytes(jpeg_bytes(random_image(rng, (size, size))))
    return root


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()
