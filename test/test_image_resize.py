"""ros2_cbpnet.learning.image_resize: the fast shrink against the one-step OpenCV reference.

The reference is what the learner's preprocessing has always done: ``cv2.INTER_AREA`` to
``size`` x ``size`` when either side shrinks, ``cv2.INTER_LINEAR`` otherwise. The fast path
(exact 2x area halvings, then one area step) may differ from it by at most
``MEAN_ABS_TOLERANCE`` grey levels on average and ``P99_ABS_TOLERANCE`` at the 99th
percentile, on frames with sharp edges and sensor noise (the hard case for any resampler).
"""
import cv2
import numpy as np
import pytest

from ros2_cbpnet.learning import image_resize
from ros2_cbpnet.learning.image_resize import (MEAN_ABS_TOLERANCE, P99_ABS_TOLERANCE, resize_batch,
                                               resize_image)
from ros_helpers import noisy_scene


def reference(img, size):
    h, w = img.shape[:2]
    shrink = h > size or w > size
    return cv2.resize(img, (size, size),
                      interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def difference(a, b):
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return float(d.mean()), float(np.percentile(d, 99))


@pytest.mark.parametrize('hw, size', [
    ((480, 640), 128), ((480, 640), 64), ((480, 640), 160), ((720, 1280), 224),
    ((1080, 1920), 128), ((1080, 1920), 224), ((1024, 1280), 96), ((512, 512), 64),
    ((481, 641), 128), ((1000, 130), 128), ((240, 320), 224)])
@pytest.mark.parametrize('channels', [3, 1])
def test_close_to_the_one_step_reference(hw, size, channels):
    img = noisy_scene(*hw, seed=hw[0] + size, channels=channels)
    out = resize_image(img, size)
    assert out.shape == (size, size) + img.shape[2:] and out.dtype == np.uint8
    assert out.flags['C_CONTIGUOUS']
    mean, p99 = difference(out, reference(img, size))
    assert mean <= MEAN_ABS_TOLERANCE and p99 <= P99_ABS_TOLERANCE, (mean, p99)


@pytest.mark.parametrize('hw, size', [((48, 64), 128), ((128, 128), 128), ((100, 130), 128),
                                      ((300, 300), 224), ((481, 641), 224)])
def test_exactly_the_reference_where_no_halving_applies(hw, size):
    """Enlarging, the same size, and shrinks by less than 3x (or odd sides): one OpenCV
    call, bit-identical to the reference."""
    img = noisy_scene(*hw, seed=7)
    np.testing.assert_array_equal(resize_image(img, size), reference(img, size))


def test_large_frames_take_the_exact_2x_steps(monkeypatch):
    """640x480 -> 128: one exact 2x area step (OpenCV's fast path) to 320x240, then the
    fractional area step; 1920x1080 -> 128: two halvings, to 480x270 (a third would leave
    135 rows, less than 1.5 * 128)."""
    calls = []
    real = cv2.resize

    def spy(img, dsize, *args, **kwargs):
        calls.append((tuple(dsize), kwargs.get('interpolation')))
        return real(img, dsize, *args, **kwargs)

    monkeypatch.setattr(image_resize.cv2, 'resize', spy)
    resize_image(noisy_scene(480, 640), 128)
    assert calls == [((320, 240), cv2.INTER_AREA), ((128, 128), cv2.INTER_AREA)]
    calls.clear()
    resize_image(noisy_scene(1080, 1920), 128)
    assert calls == [((960, 540), cv2.INTER_AREA), ((480, 270), cv2.INTER_AREA),
                     ((128, 128), cv2.INTER_AREA)]


def test_strided_views_are_read_in_place():
    """Rows with padding (a message buffer with step > width * 3) need no copy first."""
    img = noisy_scene(480, 640)
    padded = np.zeros((480, 640 * 3 + 32), np.uint8)
    padded[:, :640 * 3] = img.reshape(480, -1)
    view = padded[:, :640 * 3].reshape(480, 640, 3)
    assert not view.flags['C_CONTIGUOUS']
    np.testing.assert_array_equal(resize_image(view, 128), resize_image(img, 128))


def test_a_copy_even_at_the_target_size():
    img = noisy_scene(64, 64)
    out = resize_image(img, 64)
    assert out is not img and not np.shares_memory(out, img)
    np.testing.assert_array_equal(out, img)


def test_resize_batch_contract():
    grey = noisy_scene(480, 640, channels=1)
    batch = resize_batch([noisy_scene(480, 640), grey, grey[:, :, None], noisy_scene(32, 40)], 64)
    assert batch.shape == (4, 64, 64, 3) and batch.dtype == np.uint8
    np.testing.assert_array_equal(batch[1][:, :, 0], batch[1][:, :, 2])  # grey: 3 equal
    np.testing.assert_array_equal(batch[1], batch[2])
    np.testing.assert_array_equal(batch[3], reference(noisy_scene(32, 40), 64))
    for bad in (np.zeros((8, 8, 3), np.float32), np.zeros((8, 8, 2), np.uint8),
                np.zeros((0, 8, 3), np.uint8), np.zeros(8, np.uint8)):
        with pytest.raises(ValueError, match='image 0'):
            resize_batch([bad], 16)
    with pytest.raises(ValueError, match='size'):
        resize_image(noisy_scene(8, 8), 0)


def test_resize_batch_matches_the_learners_within_tolerance():
    """What ContinualLearner.preprocess gets when the node resized the frames already."""
    from ros2_cbpnet.learning.learner import resize_batch as learner_resize_batch

    images = [noisy_scene(480, 640, seed=s) for s in range(3)] + [noisy_scene(720, 1280, seed=9)]
    ours, theirs = resize_batch(images, 128), learner_resize_batch(images, 128)
    assert ours.shape == theirs.shape
    mean, p99 = difference(ours, theirs)
    assert mean <= MEAN_ABS_TOLERANCE and p99 <= P99_ABS_TOLERANCE, (mean, p99)
    # Frames that arrive at the model's size pass the learner's resize unchanged.
    np.testing.assert_array_equal(learner_resize_batch(list(ours), 128), ours)
