"""Tests of ros2_cbpnet.learning.datasets (no ROS). Fashion-MNIST is checked against the real
Debian package where it is installed, and must be installed under CI (.ci/run installs it)."""

import logging
import os
import subprocess

import cv2
import numpy as np
import pytest

from ros2_cbpnet.learning import datasets
from ros2_cbpnet.learning.datasets import (DatasetError, FASHION_MNIST_CLASSES, ImageDataset,
                                           load_dataset, split_tasks, task_subset)


# --------------------------------------------------------------------------- split_tasks

@pytest.mark.parametrize('num_classes, num_tasks, expected', [
    (10, 5, [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]),
    (10, 3, [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]),
    (10, 1, [list(range(10))]),
    (10, 10, [[k] for k in range(10)]),
    (7, 2, [[0, 1, 2, 3], [4, 5, 6]]),
])
def test_split_tasks(num_classes, num_tasks, expected):
    assert split_tasks(num_classes, num_tasks) == expected


@pytest.mark.parametrize('num_tasks', [0, -1, 11])
def test_split_tasks_out_of_range(num_tasks):
    with pytest.raises(ValueError):
        split_tasks(10, num_tasks)


def test_task_subset():
    images = np.arange(6 * 2 * 2 * 3, dtype=np.uint8).reshape(6, 2, 2, 3)
    labels = np.array([0, 1, 2, 1, 0, 3])
    x, y = task_subset(images, labels, [1, 3])
    assert y.tolist() == [1, 1, 3]
    assert np.array_equal(x, images[[1, 3, 5]])
    x, y = task_subset(images, labels, [])
    assert x.shape == (0, 2, 2, 3) and y.shape == (0,)


# --------------------------------------------------------------------------- digits

def _check_arrays(ds: ImageDataset, size: tuple):
    for images, labels in ((ds.train_images, ds.train_labels),
                           (ds.test_images, ds.test_labels)):
        assert images.dtype == np.uint8
        assert images.ndim == 4 and images.shape[1:] == size + (3,)
        assert labels.dtype == np.int64 and labels.shape == (len(images),)
        assert labels.min() >= 0 and labels.max() < len(ds.classes)


def test_digits_shapes_and_classes():
    ds = load_dataset('digits', seed=0)
    assert ds.name == 'digits'
    assert ds.classes == [str(d) for d in range(10)]
    assert ds.num_classes == 10
    _check_arrays(ds, (8, 8))
    assert len(ds.train_labels) + len(ds.test_labels) == 1797
    # 0..16 scaled to the full byte range, grey repeated over the channels.
    assert ds.train_images.max() == 255
    assert np.array_equal(ds.train_images[..., 0], ds.train_images[..., 2])
    # Stratified 70/30: every class is about 30 % test.
    train_counts = np.bincount(ds.train_labels, minlength=10)
    test_counts = np.bincount(ds.test_labels, minlength=10)
    frac = test_counts / (train_counts + test_counts)
    assert np.all(np.abs(frac - 0.3) < 0.02), frac


def _row_keys(images):
    return {img.tobytes() for img in images}


def test_digits_split_reproducible_and_disjoint():
    a = load_dataset('digits', seed=3)
    b = load_dataset('digits', seed=3)
    c = load_dataset('digits', seed=4)
    assert np.array_equal(a.train_images, b.train_images)
    assert np.array_equal(a.test_labels, b.test_labels)
    assert not np.array_equal(a.test_images, c.test_images)
    # Disjoint and complete: train + test is exactly the original multiset of images (sklearn's
    # digits hold a few duplicates, so set disjointness of pixel data would be the wrong test).
    from sklearn.datasets import load_digits
    ref = np.rint(load_digits().images * (255 / 16)).astype(np.uint8)
    merged = np.concatenate([a.train_images, a.test_images])
    assert sorted(img[..., 0].tobytes() for img in merged) == sorted(
        img.tobytes() for img in ref)


def test_digits_per_class_subsample():
    ds = load_dataset('digits', seed=1, train_per_class=5, test_per_class=2)
    assert np.bincount(ds.train_labels).tolist() == [5] * 10
    assert np.bincount(ds.test_labels).tolist() == [2] * 10
    again = load_dataset('digits', seed=1, train_per_class=5, test_per_class=2)
    assert np.array_equal(ds.train_images, again.train_images)
    # The subsample comes from the full train split, never from test.
    full = load_dataset('digits', seed=1)
    assert _row_keys(ds.train_images) <= _row_keys(full.train_images)
    # More than a class has keeps them all.
    big = load_dataset('digits', seed=1, test_per_class=10_000)
    assert np.array_equal(big.test_labels, full.test_labels)


def test_bad_subsample_args():
    with pytest.raises(DatasetError):
        load_dataset('digits', train_per_class=0)
    with pytest.raises(DatasetError):
        load_dataset('digits', image_size=0)


# --------------------------------------------------------------------------- folders

def _grey(value: int, size=(20, 30)) -> np.ndarray:
    return np.full(size, value, dtype=np.uint8)


def _colour_bgr(b: int, g: int, r: int, size=(40, 24)) -> np.ndarray:
    img = np.zeros(size + (3,), dtype=np.uint8)
    img[:] = (b, g, r)
    return img


def _make_class_dir(path, grey_values, colour, n_colour):
    """Some grey PNGs and some colour JPEGs of one class."""
    path.mkdir(parents=True)
    for k, v in enumerate(grey_values):
        assert cv2.imwrite(str(path / f'g{k}.png'), _grey(v))
    for k in range(n_colour):
        assert cv2.imwrite(str(path / f'c{k}.jpg'), _colour_bgr(*colour))


def test_folder_with_split_and_corrupt_file(tmp_path, caplog):
    root = tmp_path / 'objects'
    # Names chosen so that sorted order differs from creation order.
    _make_class_dir(root / 'cup', [10, 20], (255, 0, 0), 2)      # blue in BGR
    _make_class_dir(root / 'apple', [30, 40, 50], (0, 0, 255), 2)  # red in BGR
    _make_class_dir(root / 'ball', [60], (0, 255, 0), 3)
    (root / 'ball' / 'broken.jpg').write_bytes(b'this is not a jpeg')
    (root / '.hidden').mkdir()
    with caplog.at_level(logging.WARNING, logger='ros2_cbpnet.learning.datasets'):
        ds = load_dataset(f'folder:{root}', image_size=16, seed=0)
    assert ds.classes == ['apple', 'ball', 'cup']
    assert ds.name == 'objects'
    _check_arrays(ds, (16, 16))
    assert any('skipped 1 unreadable' in r.getMessage() and 'broken.jpg' in r.getMessage()
               for r in caplog.records)
    counts = np.bincount(ds.train_labels, minlength=3) + np.bincount(ds.test_labels, minlength=3)
    assert counts.tolist() == [5, 4, 4]
    # Every class lands on both sides of the split.
    assert set(ds.train_labels.tolist()) == {0, 1, 2}
    assert set(ds.test_labels.tolist()) == {0, 1, 2}
    # Colour JPEGs come back as RGB: 'apple' was saved red, so R dominates its colour images.
    apple = np.concatenate([ds.train_images[ds.train_labels == 0],
                            ds.test_images[ds.test_labels == 0]])
    colour = [img for img in apple if int(img[..., 0].mean()) - int(img[..., 2].mean()) > 100]
    assert len(colour) == 2
    # Grey PNGs become three equal channels.
    grey = [img for img in apple if np.array_equal(img[..., 0], img[..., 1])]
    assert len(grey) == 3
    again = load_dataset(f'folder:{root}', image_size=16, seed=0)
    assert np.array_equal(ds.test_images, again.test_images)


def test_folder_with_train_test_subfolders(tmp_path):
    root = tmp_path / 'split'
    for split, n in (('train', 3), ('test', 1)):
        _make_class_dir(root / split / 'b_class', [100] * n, (0, 0, 0), 1)
        _make_class_dir(root / split / 'a_class', [200] * n, (9, 9, 9), 0)
    # A PNG with alpha must load as RGB too.
    bgra = np.dstack([_colour_bgr(0, 255, 0), np.full((40, 24), 128, np.uint8)])
    assert cv2.imwrite(str(root / 'train' / 'a_class' / 'alpha.png'), bgra)
    ds = load_dataset(f'folder:{root}', image_size=12)
    assert ds.classes == ['a_class', 'b_class']
    _check_arrays(ds, (12, 12))
    assert np.bincount(ds.train_labels).tolist() == [4, 4]
    assert np.bincount(ds.test_labels).tolist() == [1, 2]
    alpha_img = [img for img in ds.train_images[ds.train_labels == 0] if img[..., 1].mean() > 250]
    assert len(alpha_img) == 1 and alpha_img[0][..., 0].max() == 0


def test_folder_class_without_images(tmp_path):
    root = tmp_path / 'x'
    _make_class_dir(root / 'good', [1, 2, 3], (0, 0, 0), 0)
    (root / 'empty').mkdir()
    (root / 'empty' / 'notes.txt').write_text('no images here')
    with pytest.raises(DatasetError, match="'empty'"):
        load_dataset(f'folder:{root}')


def test_folder_class_with_one_image_cannot_be_split(tmp_path):
    root = tmp_path / 'x'
    _make_class_dir(root / 'good', [1, 2, 3], (0, 0, 0), 0)
    _make_class_dir(root / 'lonely', [4], (0, 0, 0), 0)
    with pytest.raises(DatasetError, match='fewer than 2'):
        load_dataset(f'folder:{root}')


def test_folder_empty_and_missing(tmp_path):
    with pytest.raises(DatasetError, match='empty'):
        load_dataset(f'folder:{tmp_path}')
    missing = tmp_path / 'nope'
    with pytest.raises(DatasetError, match='does not exist') as info:
        load_dataset(f'folder:{missing}')
    assert str(missing) in str(info.value)


def test_unknown_spec():
    with pytest.raises(DatasetError, match='folder:PATH') as info:
        load_dataset('cifar-1000')
    assert 'cifar-1000' in str(info.value)
    assert isinstance(info.value, ValueError)


# --------------------------------------------------------------------------- Fashion-MNIST

def test_fashion_mnist_missing_message(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets, '_dpkg_listing', lambda package: [])
    monkeypatch.setattr(datasets, '_FASHION_SEARCH_ROOTS', (str(tmp_path),))
    with pytest.raises(DatasetError, match='apt-get install dataset-fashion-mnist'):
        load_dataset('fashion-mnist')


def _dpkg_installed(package):
    try:
        return subprocess.run(['dpkg', '-s', package], capture_output=True,
                              timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope='module')
def fashion_dir():
    """The installed Fashion-MNIST directory. Missing: a failure under CI (which installs the
    Debian package, .ci/run), a skip naming the install command elsewhere."""
    directory = datasets._find_fashion_mnist_dir()
    installed = _dpkg_installed(datasets.FASHION_MNIST_PACKAGE)
    if installed:
        assert directory is not None, (
            f'{datasets.FASHION_MNIST_PACKAGE} is installed but the loader does not find it')
    if directory is None:
        message = (f'Fashion-MNIST is not installed (Debian package '
                   f'{datasets.FASHION_MNIST_PACKAGE}; `make fashion-mnist` installs it)')
        if os.environ.get('CI', '').lower() == 'true':
            pytest.fail('CI must test the real Fashion-MNIST loader: ' + message)
        pytest.skip(message)
    return directory


def test_fashion_mnist_files_are_the_real_data_set(fashion_dir):
    """The four idx files hold Zalando's data set: published sizes, label order and pixel
    statistics (mean 0.2860, std 0.3530 of the training images, as in every framework's
    normalisation constants)."""
    def read(key):
        return datasets._read_idx_gz(os.path.join(fashion_dir, datasets._FASHION_FILES[key]))

    train_images, train_labels = read('train_images'), read('train_labels')
    test_images, test_labels = read('test_images'), read('test_labels')
    assert train_images.shape == (60000, 28, 28) and test_images.shape == (10000, 28, 28)
    assert np.bincount(train_labels).tolist() == [6000] * 10
    assert np.bincount(test_labels).tolist() == [1000] * 10
    assert train_labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert test_labels[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert train_images.mean() / 255 == pytest.approx(0.2860, abs=5e-4)
    assert train_images.std() / 255 == pytest.approx(0.3530, abs=5e-4)


def test_fashion_mnist_loads_seeded_balanced_subsets(fashion_dir):
    ds = load_dataset('fashion-mnist', seed=0, train_per_class=3, test_per_class=2)
    assert ds.name == 'fashion-mnist' and ds.classes == FASHION_MNIST_CLASSES
    _check_arrays(ds, (28, 28))
    assert np.bincount(ds.train_labels).tolist() == [3] * 10
    assert np.bincount(ds.test_labels).tolist() == [2] * 10
    # Grey images made RGB: three equal channels, and real pictures (not blank).
    assert np.array_equal(ds.train_images[..., 0], ds.train_images[..., 1])
    assert np.array_equal(ds.train_images[..., 0], ds.train_images[..., 2])
    assert all(img.std() > 10 for img in ds.train_images)
    # The same seed gives the same subset, another seed another one.
    again = load_dataset('fashion-mnist', seed=0, train_per_class=3, test_per_class=2)
    other = load_dataset('fashion-mnist', seed=1, train_per_class=3, test_per_class=2)
    assert np.array_equal(again.train_images, ds.train_images)
    assert not np.array_equal(other.train_images, ds.train_images)
    # Without a subsample: the whole official split.
    full = load_dataset('fashion-mnist', seed=0)
    assert len(full.train_labels) == 60000 and len(full.test_labels) == 10000


def test_idx_parser(tmp_path):
    import gzip
    header = bytes([0, 0, 8, 3]) + (2).to_bytes(4, 'big') + (2).to_bytes(4, 'big') \
        + (3).to_bytes(4, 'big')
    path = tmp_path / 'ok.gz'
    path.write_bytes(gzip.compress(header + bytes(range(12))))
    arr = datasets._read_idx_gz(str(path))
    assert arr.shape == (2, 2, 3) and arr[1, 1, 2] == 11
    bad = tmp_path / 'bad.gz'
    bad.write_bytes(gzip.compress(header + bytes(range(11))))
    with pytest.raises(DatasetError, match='payload'):
        datasets._read_idx_gz(str(bad))
