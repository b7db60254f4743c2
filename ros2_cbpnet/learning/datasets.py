"""Class-incremental image data sets as plain numpy arrays (no ROS, no torch).

Every loader returns an :class:`ImageDataset` whose images are ``uint8`` RGB arrays of shape
``(N, H, W, 3)`` and whose labels are ``int64`` class ids. Class-incremental tasks are built by
:func:`split_tasks`, which hands out *consecutive* class ids, so the class order below decides
which classes arrive together.

Supported specs for :func:`load_dataset`:

``digits``
    scikit-learn's bundled 8x8 hand-written digits (1,797 images, no download). Pixel values
    0..16 are scaled to 0..255 and the grey image is repeated over 3 channels; images stay 8x8.
    Seeded stratified 70/30 train/test split. Classes ``'0'`` .. ``'9'`` in numeric order.
``fashion-mnist``
    Zalando's Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (its four idx
    ``.gz`` files, normally under ``/usr/share/datasets/fashion-mnist``). Official 60,000 /
    10,000 train/test split, 28x28 images. Classes in the standard label order
    ``T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag, Ankle boot``.
``folder:PATH``
    One sub-folder per class, holding any image files OpenCV can decode (grey, colour or with
    alpha; all become RGB). If both ``PATH/train`` and ``PATH/test`` exist, they are the split
    (each with one sub-folder per class); otherwise each class is split 70/30 with the seed.
    Images are resized to ``image_size`` x ``image_size`` (``cv2.INTER_AREA``, aspect ratio not
    kept). Class names are the sub-folder names, sorted with Python's ``sorted`` (code-point
    order, so upper case sorts before lower case). Unreadable files are skipped and counted in a
    ``logging`` warning; hidden files and folders (leading ``.``) are ignored.

Within each split, images keep their source order per class (no shuffling); training code is
expected to shuffle its own batches.
"""

from __future__ import annotations

from dataclasses import dataclass
import gzip
import logging
import os
from pathlib import Path
import shutil
import subprocess
from typing import Iterable, Sequence

import cv2
import numpy as np

__all__ = [
    'DatasetError',
    'FASHION_MNIST_CLASSES',
    'ImageDataset',
    'load_dataset',
    'split_tasks',
    'task_subset',
]

logger = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = [
    'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
    'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot',
]
FASHION_MNIST_PACKAGE = 'dataset-fashion-mnist'
_FASHION_FILES = {
    'train_images': 'train-images-idx3-ubyte.gz',
    'train_labels': 'train-labels-idx1-ubyte.gz',
    'test_images': 't10k-images-idx3-ubyte.gz',
    'test_labels': 't10k-labels-idx1-ubyte.gz',
}
# Module-level so tests can point the search at an empty folder.
_FASHION_SEARCH_ROOTS: tuple[str, ...] = ('/usr/share',)
# Big trees that never hold data sets; pruning them keeps the fallback walk well under a second.
_SKIP_SEARCH_DIRS = frozenset({'doc', 'man', 'locale', 'icons', 'i18n', 'zoneinfo', 'info'})

TEST_FRACTION = 0.3


class DatasetError(ValueError):
    """A data set spec that cannot be loaded (unknown, missing, empty or malformed)."""


@dataclass
class ImageDataset:
    """Train and test images of one data set, with class names indexed by label id.

    Attributes:
        name: Short name of the data set (e.g. ``'digits'``).
        classes: Class names; ``classes[k]`` is the name of label ``k``.
        train_images: ``(N, H, W, 3)`` uint8 RGB training images.
        train_labels: ``(N,)`` int64 training labels.
        test_images: ``(M, H, W, 3)`` uint8 RGB test images (same ``H, W`` as train).
        test_labels: ``(M,)`` int64 test labels.
    """

    name: str
    classes: list[str]
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(classes)``)."""
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape ``(H, W, 3)`` shared by all images."""
        return tuple(self.train_images.shape[1:])  # type: ignore[return-value]


def load_dataset(spec: str, *, seed: int = 0, train_per_class: int | None = None,
                 test_per_class: int | None = None, image_size: int = 64) -> ImageDataset:
    """Load a data set by spec (see the module docstring for the specs and class order).

    Args:
        spec: ``'digits'``, ``'fashion-mnist'`` or ``'folder:PATH'``.
        seed: Seed of the train/test split (where one is made) and of the subsampling.
        train_per_class: Keep at most this many randomly chosen training images per class
            (``None`` keeps all).
        test_per_class: Same for the test images.
        image_size: Side length that ``folder:`` images are resized to; the built-in data sets
            keep their native size (8 for digits, 28 for Fashion-MNIST).

    Returns:
        The loaded :class:`ImageDataset`.

    Raises:
        DatasetError: Unknown spec, missing folder or package, or an empty data set.
    """
    for arg_name, value in (('train_per_class', train_per_class),
                            ('test_per_class', test_per_class)):
        if value is not None and (not _is_int(value) or value < 1):
            raise DatasetError(f'{arg_name} must be a positive integer or None, got {value!r}')
    if not _is_int(image_size) or image_size < 1:
        raise DatasetError(f'image_size must be a positive integer, got {image_size!r}')
    if not isinstance(spec, str) or not spec.strip():
        raise DatasetError(f'empty data set spec {spec!r}; {_SPEC_HELP}')

    spec = spec.strip()
    key = spec.lower().replace('_', '-')
    if key == 'digits':
        ds = _load_digits(seed)
    elif key in ('fashion-mnist', 'fashionmnist'):
        ds = _load_fashion_mnist(seed, train_per_class, test_per_class)
        # Already subsampled before the RGB expansion to save memory.
        return ds
    elif spec.startswith('folder:'):
        ds = _load_folder(spec[len('folder:'):], seed, image_size)
    else:
        hint = ''
        if os.path.isdir(os.path.expanduser(spec)):
            hint = f' (to load that directory, use folder:{spec})'
        raise DatasetError(f'unknown data set spec {spec!r}{hint}; {_SPEC_HELP}')

    rng_train, rng_test = _subsample_rngs(seed)
    ds.train_images, ds.train_labels = _subsample(
        ds.train_images, ds.train_labels, train_per_class, rng_train)
    ds.test_images, ds.test_labels = _subsample(
        ds.test_images, ds.test_labels, test_per_class, rng_test)
    return ds


def split_tasks(num_classes: int, num_tasks: int) -> list[list[int]]:
    """Split class ids ``0..num_classes-1`` into consecutive, near-equal tasks.

    Earlier tasks get the extra class when the split is uneven, e.g. 10 classes in 3 tasks
    gives ``[[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]``.

    Args:
        num_classes: Total number of classes (>= 1).
        num_tasks: Number of tasks, ``1 <= num_tasks <= num_classes``.

    Returns:
        One list of class ids per task.

    Raises:
        ValueError: ``num_tasks`` out of range or non-integer arguments.
    """
    if not _is_int(num_classes) or not _is_int(num_tasks):
        raise ValueError(f'num_classes and num_tasks must be integers, '
                         f'got {num_classes!r} and {num_tasks!r}')
    if num_classes < 1:
        raise ValueError(f'num_classes must be >= 1, got {num_classes}')
    if not 1 <= num_tasks <= num_classes:
        raise ValueError(f'num_tasks must be between 1 and num_classes={num_classes}, '
                         f'got {num_tasks}')
    base, extra = divmod(num_classes, num_tasks)
    tasks, start = [], 0
    for t in range(num_tasks):
        size = base + (1 if t < extra else 0)
        tasks.append(list(range(start, start + size)))
        start += size
    return tasks


def task_subset(images: np.ndarray, labels: np.ndarray,
                class_ids: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
    """Select the rows whose label is one of ``class_ids``.

    Args:
        images: ``(N, ...)`` array.
        labels: ``(N,)`` integer labels.
        class_ids: Class ids to keep.

    Returns:
        ``(images[mask], labels[mask])``, in the original order.

    Raises:
        ValueError: ``images`` and ``labels`` differ in length.
    """
    labels = np.asarray(labels)
    if len(images) != len(labels):
        raise ValueError(f'images and labels differ in length: {len(images)} vs {len(labels)}')
    mask = np.isin(labels, np.fromiter(class_ids, dtype=np.int64))
    return images[mask], labels[mask]


# --------------------------------------------------------------------------- helpers

_SPEC_HELP = "expected 'digits', 'fashion-mnist' or 'folder:PATH'"


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _subsample_rngs(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    # Separate streams so changing test_per_class never changes which train images are kept.
    return np.random.default_rng([seed, 1]), np.random.default_rng([seed, 2])


def _subsample_indices(labels: np.ndarray, per_class: int | None,
                       rng: np.random.Generator) -> np.ndarray:
    if per_class is None:
        return np.arange(len(labels))
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) > per_class:
            idx = np.sort(rng.choice(idx, size=per_class, replace=False))
        keep.append(idx)
    return np.sort(np.concatenate(keep)) if keep else np.arange(0)


def _subsample(images: np.ndarray, labels: np.ndarray, per_class: int | None,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    if per_class is None:
        return images, labels
    idx = _subsample_indices(labels, per_class, rng)
    return images[idx], labels[idx]


def _stratified_split(labels: np.ndarray, seed: int,
                      test_fraction: float = TEST_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """Per-class seeded split; every class keeps >= 1 image on each side (needs >= 2)."""
    # Own implementation rather than sklearn's: sklearn refuses small data sets where the test
    # share is smaller than the number of classes, which tiny robot-collected folders hit.
    rng = np.random.default_rng([seed, 0])
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_test = min(max(1, int(round(test_fraction * len(idx)))), len(idx) - 1)
        perm = rng.permutation(idx)
        test.append(perm[:n_test])
        train.append(perm[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _grey_to_rgb(images: np.ndarray) -> np.ndarray:
    return np.repeat(images[..., None], 3, axis=-1)


def _load_digits(seed: int) -> ImageDataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    images = _grey_to_rgb(grey)
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = _stratified_split(labels, seed)
    return ImageDataset(
        name='digits',
        classes=[str(d) for d in range(10)],
        train_images=images[train_idx], train_labels=labels[train_idx],
        test_images=images[test_idx], test_labels=labels[test_idx],
    )


# --------------------------------------------------------------------------- Fashion-MNIST

def _dpkg_listing(package: str) -> list[str]:
    """Files installed by a Debian package, or ``[]`` without dpkg or the package."""
    dpkg = shutil.which('dpkg')
    if dpkg is None:
        return []
    try:
        out = subprocess.run([dpkg, '-L', package], capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    return out.stdout.splitlines() if out.returncode == 0 else []


def _fashion_dir_complete(directory: str) -> bool:
    return all(os.path.isfile(os.path.join(directory, f)) for f in _FASHION_FILES.values())


def _find_fashion_mnist_dir() -> str | None:
    """Directory holding the four Fashion-MNIST idx files, or ``None``."""
    wanted = set(_FASHION_FILES.values())
    for path in _dpkg_listing(FASHION_MNIST_PACKAGE):
        if os.path.basename(path) in wanted and _fashion_dir_complete(os.path.dirname(path)):
            return os.path.dirname(path)
    for root in _FASHION_SEARCH_ROOTS:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_SEARCH_DIRS)
            # Plain MNIST ships files of the same names, so insist on 'fashion' in the path.
            if (wanted.issubset(filenames) and 'fashion' in dirpath.lower()
                    and _fashion_dir_complete(dirpath)):
                return dirpath
    return None


def _read_idx_gz(path: str) -> np.ndarray:
    """Parse a gzip-compressed idx file (the MNIST format) of unsigned bytes."""
    with gzip.open(path, 'rb') as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DatasetError(f'{path}: not an idx file (bad magic number)')
    if data[2] != 0x08:
        raise DatasetError(f'{path}: idx element type 0x{data[2]:02x} is not unsigned byte')
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim < 1 or len(data) < header:
        raise DatasetError(f'{path}: truncated idx header')
    shape = tuple(int(d) for d in np.frombuffer(data, dtype='>u4', count=ndim, offset=4))
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise DatasetError(f'{path}: idx payload has {len(data) - header} bytes, '
                           f'header says {expected}')
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _load_fashion_mnist(seed: int, train_per_class: int | None,
                        test_per_class: int | None) -> ImageDataset:
    directory = _find_fashion_mnist_dir()
    if directory is None:
        raise DatasetError(
            'Fashion-MNIST not found: it comes from the Debian package '
            f'{FASHION_MNIST_PACKAGE}; install it with '
            f'`sudo apt-get install {FASHION_MNIST_PACKAGE}` '
            '(or `make demo DATASET=fashion-mnist`, which installs it)')
    arrays = {k: _read_idx_gz(os.path.join(directory, f)) for k, f in _FASHION_FILES.items()}
    rng_train, rng_test = _subsample_rngs(seed)
    splits = {}
    for split, per_class, rng in (('train', train_per_class, rng_train),
                                  ('test', test_per_class, rng_test)):
        images, labels = arrays[f'{split}_images'], arrays[f'{split}_labels']
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetError(f'{directory}: {split} idx files have inconsistent shapes '
                               f'{images.shape} and {labels.shape}')
        labels = labels.astype(np.int64)
        if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
            raise DatasetError(f'{directory}: {split} label {labels.max()} out of range')
        idx = _subsample_indices(labels, per_class, rng)
        splits[split] = (_grey_to_rgb(images[idx]), labels[idx])
    return ImageDataset(
        name='fashion-mnist',
        classes=list(FASHION_MNIST_CLASSES),
        train_images=splits['train'][0], train_labels=splits['train'][1],
        test_images=splits['test'][0], test_labels=splits['test'][1],
    )


# --------------------------------------------------------------------------- folders

def _read_image(path: Path, image_size: int) -> np.ndarray | None:
    """Decode one file to an ``image_size`` square RGB uint8 array, ``None`` if unreadable."""
    try:
        # imdecode instead of imread: imread cannot open non-ASCII paths on every platform.
        buf = np.fromfile(str(path), dtype=np.uint8)
    except OSError:
        return None
    if buf.size == 0:
        return None
    # IMREAD_COLOR turns grey into 3 channels, drops alpha and scales 16-bit to 8-bit.
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if img is None or img.size == 0:
        return None
    img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if img.shape[:2] != (image_size, image_size):
        img = cv2.resize(img, (image_size, image_size), interpolation=cv2.INTER_AREA)
    return img


def _visible_subdirs(path: Path) -> list[Path]:
    return sorted((p for p in path.iterdir() if p.is_dir() and not p.name.startswith('.')),
                  key=lambda p: p.name)


def _class_files(class_dir: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
        files.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith('.'))
    return files


def _read_split(root: Path, classes: Sequence[str], image_size: int,
                what: str) -> tuple[np.ndarray, np.ndarray]:
    images: list[np.ndarray] = []
    labels: list[int] = []
    skipped: list[Path] = []
    for label, name in enumerate(classes):
        class_dir = root / name
        count = 0
        if class_dir.is_dir():
            for f in _class_files(class_dir):
                img = _read_image(f, image_size)
                if img is None:
                    skipped.append(f)
                    continue
                images.append(img)
                labels.append(label)
                count += 1
        if count == 0:
            raise DatasetError(f'{what}: class {name!r} has no readable image in {class_dir}')
    if skipped:
        examples = ', '.join(str(p) for p in skipped[:3])
        logger.warning('%s: skipped %d unreadable file(s) (e.g. %s)', what, len(skipped),
                       examples)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def _load_folder(raw_path: str, seed: int, image_size: int) -> ImageDataset:
    if not raw_path.strip():
        raise DatasetError("folder spec needs a path, e.g. 'folder:/data/my_objects'")
    root = Path(os.path.expanduser(raw_path.strip()))
    if not root.is_dir():
        raise DatasetError(f'data set folder {str(root)!r} does not exist or is not a directory '
                           '(folder:PATH expects one sub-folder of images per class)')
    name = root.resolve().name or str(root)
    train_dir, test_dir = root / 'train', root / 'test'
    if train_dir.is_dir() and test_dir.is_dir():
        classes = sorted({p.name for p in _visible_subdirs(train_dir)}
                         | {p.name for p in _visible_subdirs(test_dir)})
        if not classes:
            raise DatasetError(f'data set folder {str(root)!r} is empty: train/ and test/ have '
                               'no class sub-folders')
        train_x, train_y = _read_split(train_dir, classes, image_size, f'folder:{train_dir}')
        test_x, test_y = _read_split(test_dir, classes, image_size, f'folder:{test_dir}')
    else:
        classes = [p.name for p in _visible_subdirs(root)]
        if not classes:
            raise DatasetError(f'data set folder {str(root)!r} is empty: expected one '
                               'sub-folder of images per class')
        images, labels = _read_split(root, classes, image_size, f'folder:{root}')
        counts = np.bincount(labels, minlength=len(classes))
        too_small = [classes[k] for k in np.flatnonzero(counts < 2)]
        if too_small:
            raise DatasetError(f'folder:{root}: classes {too_small} have fewer than 2 readable '
                               'images, too few for a train/test split (add images or provide '
                               'train/ and test/ sub-folders)')
        train_idx, test_idx = _stratified_split(labels, seed)
        train_x, train_y = images[train_idx], labels[train_idx]
        test_x, test_y = images[test_idx], labels[test_idx]
    return ImageDataset(name=name, classes=classes, train_images=train_x, train_labels=train_y,
                        test_images=test_x, test_labels=test_y)
