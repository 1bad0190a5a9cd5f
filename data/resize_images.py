"""Resize the Omniglot images under the current folder to 28x28, in place.

The manual route of the original MAML code: copy every alphabet folder of
images_background/ and images_evaluation/ into data/omniglot_resized/, then

    cd data/omniglot_resized && python ../resize_images.py

Every */*/*.png (ALPHABET/characterNN/XXXX_YY.png) is resized with LANCZOS,
exactly as the reference script did.  Files already 28x28 are skipped, so a
rerun (or a run after an interrupted one) is safe.

prepare_omniglot.py does the same from the zips in one step and reuses
resize_image() from here.
"""
import glob
import sys

from PIL import Image

IMAGE_SIZE = (28, 28)
IMAGE_PATTERN = '*/*/*.png'


def resize_image(image):
    """The reference's resize: no mode conversion (PIL keeps mode '1')."""
    return image.resize(IMAGE_SIZE, resample=Image.LANCZOS)


def resize_file_in_place(path):
    """Resize one image file; returns False when it already was 28x28."""
    with Image.open(path) as image:
        if image.size == IMAGE_SIZE:
            return False
        resized = resize_image(image)
    resized.save(path)
    return True


def resize_tree(pattern=IMAGE_PATTERN):
    """Resize every file matching pattern (relative to the cwd).

    Returns (number resized, number already 28x28).
    """
    resized = skipped = 0
    for path in sorted(glob.glob(pattern)):
        if resize_file_in_place(path):
            resized += 1
            if resized % 1000 == 0:
                print(f'{resized} resized', flush=True)
        else:
            skipped += 1
    return resized, skipped


def main():
    resized, skipped = resize_tree()
    if resized + skipped == 0:
        print(f'error: no {IMAGE_PATTERN} images here; run this from inside '
              'the folder holding the alphabet folders', file=sys.stderr)
        return 1
    print(f'resized {resized} images to {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}, '
          f'{skipped} already were')
    return 0


if __name__ == '__main__':
    sys.exit(main())
