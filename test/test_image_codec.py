"""Tests for ros2_cbpnet.ros.image_codec (numpy/OpenCV replacement for cv_bridge)."""

from array import array
import pickle
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from ros2_cbpnet.ros import image_codec
from ros2_cbpnet.ros.image_codec import (
    compressed_msg_to_rgb,
    draw_label,
    image_msg_to_rgb,
    ImageRejected,
    REASONS,
    rgb_to_compressed_msg,
    rgb_to_image_msg,
)
from ros_helpers import noisy_scene

H, W = 7, 10


def raw_msg(encoding, height, width, step, data, big=0):
    return SimpleNamespace(encoding=encoding, height=height, width=width, step=step,
                           is_bigendian=big, data=data)


def comp_msg(data, fmt='jpeg'):
    return SimpleNamespace(format=fmt, data=data)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def rgb(rng):
    return rng.integers(0, 256, (H, W, 3), dtype=np.uint8)


def smooth_rgb(height=48, width=64):
    """A smooth image, so that JPEG error is small and meaningful."""
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([xx * 255 // (width - 1), yy * 255 // (height - 1),
                    (xx + yy) * 255 // (width + height - 2)], axis=-1)
    return img.astype(np.uint8)


def assert_rgb(out, height, width):
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.uint8
    assert out.shape == (height, width, 3)
    assert out.flags['C_CONTIGUOUS']


def rejected(reason, fn, *args, **kwargs):
    with pytest.raises(ImageRejected) as info:
        fn(*args, **kwargs)
    assert info.value.reason == reason, str(info.value)
    assert reason in str(info.value)
    return info.value


# ---------------------------------------------------------------- exception / constants


def test_reasons_and_exception():
    assert set(REASONS) == {'empty', 'too_large', 'unknown_encoding', 'bad_step', 'short_data',
                            'long_data', 'bad_compressed', 'bad_format'}
    assert len(REASONS) == len(set(REASONS))
    exc = ImageRejected('short_data', 'only 3 bytes')
    assert isinstance(exc, ValueError)
    assert exc.reason == 'short_data'
    assert 'only 3 bytes' in str(exc)
    copy = pickle.loads(pickle.dumps(exc))
    assert copy.reason == 'short_data' and str(copy) == str(exc)
    with pytest.raises(ValueError):
        ImageRejected('not_a_reason', 'x')


def test_module_imports_without_ros():
    import subprocess
    import sys
    code = ('import sys; import ros2_cbpnet.ros.image_codec; '
            'assert "rclpy" not in sys.modules and "sensor_msgs" not in sys.modules')
    subprocess.run([sys.executable, '-c', code], check=True)


# ---------------------------------------------------------------- raw round trips


@pytest.mark.parametrize('encoding, make', [
    ('rgb8', lambda rgb, a: rgb),
    ('RGB8', lambda rgb, a: rgb),
    ('bgr8', lambda rgb, a: rgb[..., ::-1]),
    ('8UC3', lambda rgb, a: rgb[..., ::-1]),
    ('rgba8', lambda rgb, a: np.dstack([rgb, a])),
    ('bgra8', lambda rgb, a: np.dstack([rgb[..., ::-1], a])),
])
def test_8bit_colour_round_trip(rgb, rng, encoding, make):
    alpha = rng.integers(0, 256, (H, W), dtype=np.uint8)
    buf = np.ascontiguousarray(make(rgb, alpha))
    out = image_msg_to_rgb(raw_msg(encoding, H, W, buf.strides[0], buf.tobytes()))
    assert_rgb(out, H, W)
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize('encoding', ['mono8', '8UC1', 'Mono8'])
def test_mono8_round_trip(rng, encoding):
    grey = rng.integers(0, 256, (H, W), dtype=np.uint8)
    out = image_msg_to_rgb(raw_msg(encoding, H, W, W, grey.tobytes()))
    assert_rgb(out, H, W)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)


@pytest.mark.parametrize('big', [0, 1])
@pytest.mark.parametrize('encoding, channels, order', [
    ('rgb16', 3, [0, 1, 2]),
    ('bgr16', 3, [2, 1, 0]),
    ('rgba16', 4, [0, 1, 2]),
    ('bgra16', 4, [2, 1, 0]),
])
def test_16bit_colour_round_trip(rng, encoding, channels, order, big):
    values = rng.integers(0, 65536, (H, W, channels), dtype=np.uint16)
    data = values.astype('>u2' if big else '<u2').tobytes()
    out = image_msg_to_rgb(raw_msg(encoding, H, W, W * channels * 2, data, big=big))
    assert_rgb(out, H, W)
    np.testing.assert_array_equal(out, (values[..., order] >> 8).astype(np.uint8))


@pytest.mark.parametrize('big', [0, 1, True])
@pytest.mark.parametrize('encoding', ['mono16', '16UC1'])
def test_mono16_high_byte(rng, encoding, big):
    values = rng.integers(0, 65536, (H, W), dtype=np.uint16)
    data = values.astype('>u2' if big else '<u2').tobytes()
    out = image_msg_to_rgb(raw_msg(encoding, H, W, W * 2, data, big=big))
    assert_rgb(out, H, W)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], (values >> 8).astype(np.uint8))


def test_wrong_endianness_gives_low_byte(rng):
    values = rng.integers(0, 65536, (H, W), dtype=np.uint16)
    out = image_msg_to_rgb(raw_msg('mono16', H, W, W * 2, values.astype('<u2').tobytes(), 1))
    np.testing.assert_array_equal(out[..., 0], (values & 0xFF).astype(np.uint8))


@pytest.mark.parametrize('container', [
    bytes, bytearray, lambda b: array('B', b), lambda b: list(b), lambda b: tuple(b),
    lambda b: np.frombuffer(b, np.uint8).copy(), memoryview,
])
def test_data_containers(rgb, container):
    out = image_msg_to_rgb(raw_msg('rgb8', H, W, W * 3, container(rgb.tobytes())))
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize('encoding, bpp', [
    ('rgb8', 3), ('bgr8', 3), ('bgra8', 4), ('mono8', 1), ('rgb16', 6), ('mono16', 2),
    ('bayer_rggb8', 1), ('yuv422', 2), ('yuv422_yuy2', 2),
])
@pytest.mark.parametrize('big', [0, 1])
def test_padded_step_matches_unpadded(rng, encoding, bpp, big):
    width = 10
    rows = rng.integers(0, 256, (H, width * bpp), dtype=np.uint8)
    pad = rng.integers(0, 256, (H, 7), dtype=np.uint8)
    padded = np.hstack([rows, pad])
    ref = image_msg_to_rgb(raw_msg(encoding, H, width, width * bpp, rows.tobytes(), big))
    out = image_msg_to_rgb(raw_msg(encoding, H, width, width * bpp + 7, padded.tobytes(), big))
    assert_rgb(out, H, width)
    np.testing.assert_array_equal(out, ref)


def test_real_image_msg_round_trip(rgb):
    pytest.importorskip('sensor_msgs.msg')
    from std_msgs.msg import Header
    header = Header(frame_id='camera_optical')
    header.stamp.sec, header.stamp.nanosec = 12, 345
    for encoding, bpp in [('rgb8', 3), ('bgr8', 3), ('rgba8', 4), ('bgra8', 4)]:
        msg = rgb_to_image_msg(rgb, encoding, header=header)
        assert type(msg).__name__ == 'Image'
        assert (msg.height, msg.width, msg.step) == (H, W, W * bpp)
        assert msg.encoding == encoding and msg.is_bigendian == 0
        assert len(msg.data) == H * W * bpp
        assert msg.header.frame_id == 'camera_optical'
        assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (12, 345)
        assert msg.header is not header
        np.testing.assert_array_equal(image_msg_to_rgb(msg), rgb)
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    for encoding, bpp in [('mono8', 1), ('mono16', 2)]:
        msg = rgb_to_image_msg(rgb, encoding)
        assert msg.step == W * bpp
        out = image_msg_to_rgb(msg)
        for c in range(3):
            np.testing.assert_array_equal(out[..., c], grey)
    bgra = np.frombuffer(bytes(rgb_to_image_msg(rgb, 'bgra8').data), np.uint8).reshape(H, W, 4)
    assert (bgra[..., 3] == 255).all()
    np.testing.assert_array_equal(bgra[..., 2::-1], rgb)


def test_builders_reject_bad_arguments(rgb):
    pytest.importorskip('sensor_msgs.msg')
    with pytest.raises(ValueError):
        rgb_to_image_msg(rgb, 'yuv422')
    with pytest.raises(ValueError):
        rgb_to_image_msg(rgb.astype(np.float32))
    with pytest.raises(ValueError):
        rgb_to_image_msg(rgb[..., :2])
    with pytest.raises(ValueError):
        rgb_to_compressed_msg(rgb, 'bmp')
    with pytest.raises(ValueError):
        rgb_to_compressed_msg(rgb, 'jpeg', quality=101)


# ---------------------------------------------------------------- bayer / yuv


def bayer_mosaic(pattern, colour, height, width):
    index = {'r': 0, 'g': 1, 'b': 2}
    mosaic = np.zeros((height, width), np.uint8)
    for dy in range(2):
        for dx in range(2):
            mosaic[dy::2, dx::2] = colour[index[pattern[2 * dy + dx]]]
    return mosaic


@pytest.mark.parametrize('pattern', ['rggb', 'bggr', 'gbrg', 'grbg'])
@pytest.mark.parametrize('height, width', [(8, 10), (7, 9)])
def test_bayer_flat_colour(pattern, height, width):
    colour = (200, 90, 30)
    mosaic = bayer_mosaic(pattern, colour, height, width)
    out = image_msg_to_rgb(raw_msg(f'bayer_{pattern}8', height, width, width, mosaic.tobytes()))
    assert_rgb(out, height, width)
    inner = out[2:-2, 2:-2].reshape(-1, 3).astype(float)
    np.testing.assert_allclose(inner.mean(axis=0), colour, atol=3)


@pytest.mark.parametrize('encoding, code', [
    ('yuv422', cv2.COLOR_RGB2YUV_UYVY),
    ('yuv422_yuy2', cv2.COLOR_RGB2YUV_YUY2),
    ('UYVY', cv2.COLOR_RGB2YUV_UYVY),
    ('yuyv', cv2.COLOR_RGB2YUV_YUY2),
])
def test_yuv422_flat_colour(encoding, code):
    colour = (200, 90, 30)
    flat = np.full((6, 8, 3), colour, np.uint8)
    packed = cv2.cvtColor(flat, code)
    assert packed.shape == (6, 8, 2)
    out = image_msg_to_rgb(raw_msg(encoding, 6, 8, 16, packed.tobytes()))
    assert_rgb(out, 6, 8)
    np.testing.assert_allclose(out.reshape(-1, 3).mean(axis=0), colour, atol=3)


def test_yuv422_byte_order_matters():
    """UYVY and YUY2 must not be swapped: decoding one as the other ruins the colour."""
    colour = (200, 90, 30)
    packed = cv2.cvtColor(np.full((4, 8, 3), colour, np.uint8), cv2.COLOR_RGB2YUV_UYVY)
    out = image_msg_to_rgb(raw_msg('yuv422_yuy2', 4, 8, 16, packed.tobytes()))
    assert np.abs(out.reshape(-1, 3).mean(axis=0) - colour).max() > 20


# ---------------------------------------------------------------- raw rejections


def test_reject_empty():
    rejected('empty', image_msg_to_rgb, raw_msg('rgb8', 0, 4, 12, b''))
    rejected('empty', image_msg_to_rgb, raw_msg('rgb8', 4, 0, 0, b''))
    rejected('empty', image_msg_to_rgb, raw_msg('rgb8', -1, 4, 12, b''))


def test_reject_too_large_before_touching_data():
    # data=None would be 'bad_format' if it were looked at.
    exc = rejected('too_large', image_msg_to_rgb, raw_msg('rgb8', 10000, 10000, 30000, None))
    assert '100000000' in str(exc)
    rejected('too_large', image_msg_to_rgb, raw_msg('rgb8', 5, 5, 15, bytes(75)), max_pixels=24)
    out = image_msg_to_rgb(raw_msg('rgb8', 5, 5, 15, bytes(75)), max_pixels=25)
    assert_rgb(out, 5, 5)


@pytest.mark.parametrize('encoding', ['rgb9', '32FC1', 'jpeg', '', None, 3, b'rgb8'])
def test_reject_unknown_encoding(encoding):
    exc = rejected('unknown_encoding', image_msg_to_rgb, raw_msg(encoding, 2, 2, 6, bytes(12)))
    assert repr(encoding)[:10] in str(exc)


def test_reject_bad_step():
    exc = rejected('bad_step', image_msg_to_rgb, raw_msg('rgb8', 2, 4, 11, bytes(22)))
    assert '11' in str(exc) and '12' in str(exc)
    rejected('bad_step', image_msg_to_rgb, raw_msg('mono16', 2, 4, 4, bytes(8)))
    rejected('bad_step', image_msg_to_rgb, raw_msg('mono8', 2, 4, -4, bytes(8)))
    rejected('bad_step', image_msg_to_rgb, raw_msg('mono8', 2, 4, 4.0, bytes(8)))


def test_reject_short_and_long_data():
    exc = rejected('short_data', image_msg_to_rgb, raw_msg('rgb8', 2, 4, 12, bytes(23)))
    assert '23' in str(exc) and '24' in str(exc)
    rejected('short_data', image_msg_to_rgb, raw_msg('rgb8', 2, 4, 14, bytes(24)))
    exc = rejected('long_data', image_msg_to_rgb, raw_msg('rgb8', 2, 4, 12, bytes(25)))
    assert '25' in str(exc) and '24' in str(exc)


@pytest.mark.parametrize('msg', [
    raw_msg('rgb8', 2, 2, 6, None),
    raw_msg('rgb8', 2, 2, 6, 'x' * 12),
    raw_msg('rgb8', 2, 2, 6, [0] * 11 + [256]),
    raw_msg('rgb8', 2, 2, 6, [0.5] * 12),
    raw_msg('rgb8', 'two', 2, 6, bytes(12)),
    raw_msg('rgb8', 2, None, 6, bytes(12)),
    raw_msg('yuv422', 2, 3, 6, bytes(12)),
    SimpleNamespace(),
])
def test_reject_bad_format(msg):
    rejected('bad_format', image_msg_to_rgb, msg)


def test_validation_order():
    # Each message is wrong in two ways; the earlier check in the documented order wins.
    rejected('empty', image_msg_to_rgb, raw_msg('nope', 0, 5, 0, b''))
    rejected('too_large', image_msg_to_rgb, raw_msg('nope', 9000, 9000, 0, b''))
    rejected('unknown_encoding', image_msg_to_rgb, raw_msg('nope', 2, 2, 0, b''))
    rejected('bad_step', image_msg_to_rgb, raw_msg('rgb8', 2, 2, 5, b''))
    rejected('short_data', image_msg_to_rgb, raw_msg('yuv422', 2, 3, 6, bytes(11)))


# ---------------------------------------------------------------- no aliasing


@pytest.mark.parametrize('encoding, bpp', [
    ('rgb8', 3), ('bgr8', 3), ('mono8', 1), ('rgb16', 6), ('bayer_gbrg8', 1), ('yuv422', 2),
])
def test_output_is_not_a_view_of_input(rng, encoding, bpp):
    raw = bytearray(rng.integers(0, 256, H * W * bpp, dtype=np.uint8).tobytes())
    for data in (raw, np.frombuffer(raw, np.uint8), array('B', raw)):
        out = image_msg_to_rgb(raw_msg(encoding, H, W, W * bpp, data))
        before = out.copy()
        assert not np.shares_memory(out, np.frombuffer(data, np.uint8))
        view = np.frombuffer(data, np.uint8)
        view[:] = 255 - view  # the message buffer is reused by the caller
        np.testing.assert_array_equal(out, before)
        view[:] = 255 - view


# ---------------------------------------------------------------- compressed


def encode(img_bgr, ext, params=()):
    ok, buf = cv2.imencode(ext, img_bgr, list(params))
    assert ok
    return buf.tobytes()


def test_compressed_round_trip_real_msgs():
    pytest.importorskip('sensor_msgs.msg')
    img = smooth_rgb()
    png = rgb_to_compressed_msg(img, 'png')
    assert type(png).__name__ == 'CompressedImage' and png.format == 'png'
    np.testing.assert_array_equal(compressed_msg_to_rgb(png), img)
    jpg = rgb_to_compressed_msg(img, 'jpeg', quality=95)
    assert jpg.format == 'jpeg'
    out = compressed_msg_to_rgb(jpg)
    assert_rgb(out, *img.shape[:2])
    assert np.abs(out.astype(int) - img.astype(int)).mean() < 3
    # Channel order must survive (a swapped R/B would have a huge error on this image).
    assert np.abs(out.astype(int) - img[..., ::-1].astype(int)).mean() > 20


@pytest.mark.parametrize('fmt', ['', 'jpeg', 'png', 'rgb8; jpeg compressed bgr8', 'garbage'])
def test_compressed_format_string_is_informational(fmt):
    img = smooth_rgb()
    for data in (encode(img[..., ::-1], '.png'), encode(img[..., ::-1], '.jpg')):
        out = compressed_msg_to_rgb(comp_msg(data, fmt))
        assert_rgb(out, *img.shape[:2])


def test_compressed_data_containers():
    img = smooth_rgb()
    data = encode(img[..., ::-1], '.png')
    for container in (bytes, bytearray, lambda b: array('B', b), list,
                      lambda b: np.frombuffer(b, np.uint8)):
        np.testing.assert_array_equal(compressed_msg_to_rgb(comp_msg(container(data))), img)


def test_grey_png(rng):
    grey = rng.integers(0, 256, (H, W), dtype=np.uint8)
    out = compressed_msg_to_rgb(comp_msg(encode(grey, '.png'), 'png'))
    assert_rgb(out, H, W)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)


def test_rgba_png(rgb, rng):
    alpha = rng.integers(0, 256, (H, W), dtype=np.uint8)
    bgra = np.dstack([rgb[..., ::-1], alpha])
    out = compressed_msg_to_rgb(comp_msg(encode(bgra, '.png'), 'png'))
    assert_rgb(out, H, W)
    np.testing.assert_array_equal(out, rgb)


def test_16bit_png(rgb):
    out = compressed_msg_to_rgb(comp_msg(encode(rgb[..., ::-1].astype(np.uint16) * 257, '.png')))
    assert_rgb(out, H, W)
    np.testing.assert_array_equal(out, rgb)


def test_jpeg_with_padding_after_eoi():
    img = smooth_rgb()
    data = encode(img[..., ::-1], '.jpg') + bytes(10000)
    out = compressed_msg_to_rgb(comp_msg(data))
    assert np.abs(out.astype(int) - img.astype(int)).mean() < 5


def test_reject_compressed_empty():
    rejected('empty', compressed_msg_to_rgb, comp_msg(b''))
    rejected('empty', compressed_msg_to_rgb, comp_msg(array('B')))


def test_reject_compressed_bad_format(rng):
    rejected('bad_format', compressed_msg_to_rgb, comp_msg(rng.bytes(500)))
    rejected('bad_format', compressed_msg_to_rgb, comp_msg(b'GIF89a' + bytes(100), 'gif'))
    rejected('bad_format', compressed_msg_to_rgb, comp_msg(None))
    depth = bytes(12) + encode(np.zeros((4, 4), np.uint16), '.png')
    exc = rejected('bad_format', compressed_msg_to_rgb,
                   comp_msg(depth, '16UC1; compressedDepth png'))
    assert 'compressedDepth' in str(exc)


def test_reject_compressed_garbage_and_truncated(rng):
    img = smooth_rgb()
    jpg = encode(img[..., ::-1], '.jpg')
    png = encode(img[..., ::-1], '.png')
    idat = png.index(b'IDAT')
    flipped = bytearray(png)
    flipped[idat + 14] ^= 0xFF  # one byte of compressed data: the chunk CRC no longer matches
    bad = {
        'JPEG truncated in the scan': jpg[:len(jpg) // 2],
        'JPEG without EOI': jpg[:len(jpg) - 2],
        'JPEG truncated in the headers': jpg[:40],
        'JPEG magic, garbage body': b'\xff\xd8' + rng.bytes(400),
        'SOI + EOI, no frame': b'\xff\xd8\xff\xd9',
        'PNG truncated in IDAT': png[:len(png) // 2],
        'PNG truncated in the header': png[:20],
        'PNG signature, garbage body': png[:8] + rng.bytes(400),
        'PNG with a corrupt IDAT byte': bytes(flipped),
    }
    for what, data in bad.items():
        with pytest.raises(ImageRejected) as info:
            compressed_msg_to_rgb(comp_msg(data))
        assert info.value.reason == 'bad_compressed', (what, str(info.value))


def test_scrambled_jpeg_entropy_data_decodes_to_a_valid_image(rng):
    """JPEG has no checksum: random entropy-coded data between intact headers and EOI is a
    complete file that libjpeg decodes (with a warning). It cannot be told from a real photo,
    so the codec's promise is only a valid image of the header's size, never a crash."""
    img = smooth_rgb()
    jpg = encode(img[..., ::-1], '.jpg')
    sos = jpg.index(b'\xff\xda')
    for _ in range(5):
        data = jpg[:sos + 20] + rng.bytes(len(jpg) - sos - 22) + b'\xff\xd9'
        try:
            out = compressed_msg_to_rgb(comp_msg(data))
        except ImageRejected as exc:  # a decoder that refuses it is fine too
            assert exc.reason == 'bad_compressed', str(exc)
        else:
            assert_rgb(out, *img.shape[:2])


def test_truncated_jpeg_rejected_even_if_decoder_tolerates_it(monkeypatch):
    # Older OpenCV builds return a grey-filled image for a truncated JPEG; simulate that.
    img = smooth_rgb()
    jpg = encode(img[..., ::-1], '.jpg')
    monkeypatch.setattr(image_codec.cv2, 'imdecode',
                        lambda buf, flags: np.zeros(img.shape, np.uint8))
    rejected('bad_compressed', compressed_msg_to_rgb, comp_msg(jpg[:-300]))
    assert_rgb(compressed_msg_to_rgb(comp_msg(jpg)), *img.shape[:2])


def _set_jpeg_size(jpg, width, height, fake_sof_before=False):
    sof = jpg.index(b'\xff\xc0')
    out = bytearray(jpg)
    out[sof + 5:sof + 9] = height.to_bytes(2, 'big') + width.to_bytes(2, 'big')
    if fake_sof_before:
        # An APP15 segment whose payload looks like a tiny SOF: a marker parser must skip it
        # by its length, not pattern-match the bytes.
        payload = b'\xff\xc0\x00\x11\x08\x00\x08\x00\x08\x03'
        app = b'\xff\xef' + (len(payload) + 2).to_bytes(2, 'big') + payload
        out[2:2] = app + b'junk'  # plus junk bytes that libjpeg would skip, too
    return bytes(out)


@pytest.mark.parametrize('fake_sof_before', [False, True])
def test_jpeg_bomb_rejected_without_decoding(monkeypatch, fake_sof_before):
    jpg = encode(smooth_rgb()[..., ::-1], '.jpg')
    small = _set_jpeg_size(jpg, 64, 48, fake_sof_before)
    assert compressed_msg_to_rgb(comp_msg(small)).shape == (48, 64, 3)

    def no_decode(*args, **kwargs):
        raise AssertionError('imdecode must not be called for an oversized image')

    monkeypatch.setattr(image_codec.cv2, 'imdecode', no_decode)
    exc = rejected('too_large', compressed_msg_to_rgb,
                   comp_msg(_set_jpeg_size(jpg, 60000, 60000, fake_sof_before)))
    assert '60000x60000' in str(exc)
    rejected('too_large', compressed_msg_to_rgb, comp_msg(jpg), max_pixels=64 * 48 - 1)


def test_png_bomb_rejected_without_decoding(monkeypatch):
    png = bytearray(encode(smooth_rgb()[..., ::-1], '.png'))
    png[16:24] = (60000).to_bytes(4, 'big') * 2

    def no_decode(*args, **kwargs):
        raise AssertionError('imdecode must not be called for an oversized image')

    monkeypatch.setattr(image_codec.cv2, 'imdecode', no_decode)
    exc = rejected('too_large', compressed_msg_to_rgb, comp_msg(bytes(png), 'png'))
    assert '60000x60000' in str(exc)


def test_zero_size_headers_rejected():
    jpg = encode(smooth_rgb()[..., ::-1], '.jpg')
    rejected('bad_compressed', compressed_msg_to_rgb, comp_msg(_set_jpeg_size(jpg, 0, 48)))
    png = bytearray(encode(smooth_rgb()[..., ::-1], '.png'))
    png[16:20] = bytes(4)
    rejected('bad_compressed', compressed_msg_to_rgb, comp_msg(bytes(png)))


# ---------------------------------------------------------------- draw_label


@pytest.mark.parametrize('shape', [(48, 64, 3), (1, 1, 3), (3, 200, 3), (300, 20, 3), (20, 30)])
@pytest.mark.parametrize('text, score', [
    ('dog', 0.93), ('caf\u00e9 \u2603 \u72ac', None), ('x' * 200, float('nan')), ('', 1),
])
def test_draw_label(rng, shape, text, score):
    img = rng.integers(0, 256, shape, dtype=np.uint8)
    before = img.copy()
    out = draw_label(img, text, score)
    assert out.dtype == np.uint8 and out.shape == shape[:2] + (3,)
    assert not np.shares_memory(out, img)
    np.testing.assert_array_equal(img, before)
    if shape == (48, 64, 3):
        assert not np.array_equal(out[:3], before[:3, :, ::-1])  # banner drawn
        np.testing.assert_array_equal(out[-5:], before[-5:, :, ::-1])  # rest is BGR of input


# ---------------------------------------------------------------- fuzz


def _valid_raw(rng):
    encodings = list(image_codec._RAW_LAYOUT) + ['8UC1', '8UC3', '16UC1', 'BGR8']
    encoding = encodings[rng.integers(len(encodings))]
    bpp = image_codec._RAW_LAYOUT[image_codec._ALIASES.get(encoding.lower(), encoding.lower())][0]
    height, width = int(rng.integers(1, 9)), 2 * int(rng.integers(1, 6))
    step = width * bpp + int(rng.integers(0, 4))
    data = rng.bytes(step * height)
    return dict(encoding=encoding, height=height, width=width, step=step,
                is_bigendian=int(rng.integers(2)), data=data)


def _mutate_bytes(rng, data):
    data = bytearray(data)
    kind = rng.integers(5)
    if kind == 0 and data:
        del data[int(rng.integers(len(data))):]
    elif kind == 1:
        data += rng.bytes(int(rng.integers(1, 64)))
    elif kind == 2 and data:
        for _ in range(int(rng.integers(1, 8))):
            data[int(rng.integers(len(data)))] = int(rng.integers(256))
    elif kind == 3 and data:
        start = int(rng.integers(len(data)))
        data[start:start] = rng.bytes(int(rng.integers(1, 32)))
    else:
        data = bytearray(rng.bytes(int(rng.integers(0, 64))))
    return bytes(data)


def test_fuzz_raw():
    rng = np.random.default_rng(20240611)
    weird = [0, -1, 1, 3, 2 ** 31, 2 ** 32 + 1, None, 'x', 2.5, True]
    outcomes = {'ok': 0}
    for _ in range(400):
        fields = _valid_raw(rng)
        for _ in range(int(rng.integers(0, 3))):
            field = list(fields)[rng.integers(len(fields))]
            roll = rng.random()
            if field == 'data':
                fields['data'] = _mutate_bytes(rng, fields['data'])
            elif field == 'encoding':
                fields['encoding'] = ['rgb8', 'yuv422', 'bayer_xyz8', '', None, 'MONO16'][
                    rng.integers(6)]
            elif roll < 0.5:
                fields[field] = weird[rng.integers(len(weird))]
            else:
                fields[field] = int(fields[field] or 0) + int(rng.integers(-3, 4))
        msg = SimpleNamespace(**fields)
        try:
            out = image_msg_to_rgb(msg, max_pixels=10_000)
        except ImageRejected as exc:
            assert exc.reason in REASONS
            outcomes[exc.reason] = outcomes.get(exc.reason, 0) + 1
        else:
            assert_rgb(out, msg.height, msg.width)
            outcomes['ok'] += 1
    # The fuzzer should exercise both paths substantially.
    assert outcomes['ok'] > 50 and sum(outcomes.values()) - outcomes['ok'] > 100, outcomes


def test_fuzz_compressed():
    rng = np.random.default_rng(777)
    seeds = []
    for shape in [(16, 24, 3), (9, 13), (12, 12, 4)]:
        img = cv2.GaussianBlur(rng.integers(0, 256, shape, dtype=np.uint8), (5, 5), 0)
        seeds.append(encode(img, '.png'))
        if len(shape) == 2 or shape[2] == 3:
            seeds.append(encode(img, '.jpg', [cv2.IMWRITE_JPEG_QUALITY, 80]))
    outcomes = {'ok': 0}
    for _ in range(300):
        data = seeds[rng.integers(len(seeds))]
        for _ in range(int(rng.integers(1, 3))):
            data = _mutate_bytes(rng, data) if rng.random() < 0.8 else data[:2] + _mutate_bytes(
                rng, data[2:])
        try:
            out = compressed_msg_to_rgb(comp_msg(data), max_pixels=50_000)
        except ImageRejected as exc:
            assert exc.reason in REASONS
            outcomes[exc.reason] = outcomes.get(exc.reason, 0) + 1
        else:
            assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
            assert out.flags['C_CONTIGUOUS'] and 0 < out.shape[0] * out.shape[1] <= 50_000
            outcomes['ok'] += 1
    assert sum(outcomes.values()) - outcomes['ok'] > 100, outcomes


# ---------------------------------------------------------------- decoding to the model input
# (size=...: what the node does with camera frames; see ros2_cbpnet.learning.image_resize for the
# tolerances of the fast resize against the one-step reference)

def reference_resize(rgb, size):
    shrink = rgb.shape[0] > size or rgb.shape[1] > size
    return cv2.resize(rgb, (size, size),
                      interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def assert_close(out, ref):
    from ros2_cbpnet.learning.image_resize import MEAN_ABS_TOLERANCE, P99_ABS_TOLERANCE
    d = np.abs(out.astype(np.int16) - ref.astype(np.int16))
    mean, p99 = float(d.mean()), float(np.percentile(d, 99))
    assert mean <= MEAN_ABS_TOLERANCE and p99 <= P99_ABS_TOLERANCE, (mean, p99)


@pytest.mark.parametrize('encoding', ['rgb8', 'bgr8', 'rgba8', 'bgra8', 'mono8', 'mono16'])
@pytest.mark.parametrize('size', [64, 128, 224])
def test_raw_decode_to_size_is_the_full_decode_resized(encoding, size):
    """8-bit RGB/BGR(A)/mono are resized before the channel conversion, which commutes with
    it: the same pixels as converting first. Others convert at full size, then resize."""
    from ros2_cbpnet.learning.image_resize import resize_image
    msg = rgb_to_image_msg(noisy_scene(480, 640, size), encoding)
    full = image_msg_to_rgb(msg)
    out = image_msg_to_rgb(msg, size=size)
    assert_rgb(out, size, size)
    np.testing.assert_array_equal(out, resize_image(full, size))
    assert_close(out, reference_resize(full, size))


@pytest.mark.parametrize('encoding', ['bayer_rggb8', 'yuv422', 'bgr16'])
def test_raw_decode_to_size_of_mosaics_and_16_bit(rng, encoding):
    from ros2_cbpnet.learning.image_resize import resize_image
    bpp = image_codec._RAW_LAYOUT[encoding][0]
    msg = raw_msg(encoding, 96, 128, 128 * bpp + 6,
                  rng.integers(0, 256, 96 * (128 * bpp + 6), dtype=np.uint8).tobytes())
    out = image_msg_to_rgb(msg, size=32)
    assert_rgb(out, 32, 32)
    np.testing.assert_array_equal(out, resize_image(image_msg_to_rgb(msg), 32))


def test_raw_decode_to_size_reads_padded_rows_and_never_aliases(rng):
    img = noisy_scene(120, 160)
    bgr = img[..., ::-1]
    padded = np.zeros((120, 160 * 3 + 8), np.uint8)
    padded[:, :480] = bgr.reshape(120, -1)
    data = bytearray(padded.tobytes())
    msg = raw_msg('bgr8', 120, 160, 488, data)
    out = image_msg_to_rgb(msg, size=48)
    np.testing.assert_array_equal(out, image_msg_to_rgb(raw_msg('bgr8', 120, 160, 480,
                                                                bgr.tobytes()), size=48))
    before = out.copy()
    data[:] = bytes(len(data))  # the message buffer is reused: the result must not change
    np.testing.assert_array_equal(out, before)
    same = image_msg_to_rgb(rgb_to_image_msg(img[:48, :48], 'rgb8'), size=48)
    np.testing.assert_array_equal(same, img[:48, :48])  # already the size: an exact copy


@pytest.mark.parametrize('width, height, size, factor', [
    (640, 480, 128, 2), (640, 480, 64, 4), (640, 480, 224, 1), (640, 480, 0, 1),
    (1920, 1080, 128, 4), (1920, 1080, 64, 8), (1280, 720, 224, 2), (641, 481, 64, 1),
    (644, 484, 64, 4), (320, 240, 128, 1), (100, 90, 128, 1)])
def test_jpeg_reduction_factor(width, height, size, factor):
    """The largest 1/2, 1/4, 1/8 scale that divides both sides and leaves >= 1.5 * size."""
    assert image_codec.jpeg_reduction(width, height, size) == factor


@pytest.mark.parametrize('height, width, size', [(480, 640, 128), (480, 640, 64),
                                                 (1080, 1920, 128), (720, 1280, 224),
                                                 (481, 641, 128), (240, 320, 128)])
def test_reduced_jpeg_decode_matches_full_decode_and_resize(monkeypatch, height, width, size):
    img = noisy_scene(height, width, size)
    msg = rgb_to_compressed_msg(img, 'jpeg', quality=80)
    full = compressed_msg_to_rgb(msg)
    flags_seen = []
    real = cv2.imdecode

    def spy(buf, flags):
        flags_seen.append(flags)
        return real(buf, flags)

    monkeypatch.setattr(image_codec.cv2, 'imdecode', spy)
    out = compressed_msg_to_rgb(msg, size=size)
    assert_rgb(out, size, size)
    assert_close(out, reference_resize(full, size))
    factor = image_codec.jpeg_reduction(width, height, size)
    reduced = {2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
               8: cv2.IMREAD_REDUCED_GRAYSCALE_8}
    assert flags_seen == [image_codec._IMREAD_FLAGS | reduced.get(factor, 0)]
    if (height, width, size) == (480, 640, 128):
        assert factor == 2  # the case the node meets most: a VGA camera at the default size


def test_png_decode_to_size_is_full_decode_and_resize():
    from ros2_cbpnet.learning.image_resize import resize_image
    img = noisy_scene(240, 320)
    msg = rgb_to_compressed_msg(img, 'png')
    out = compressed_msg_to_rgb(msg, size=64)
    np.testing.assert_array_equal(out, resize_image(img, 64))  # PNG is lossless


def test_decode_to_size_keeps_every_validation(monkeypatch, rng):
    """Size limits come from the header before any decoding; truncated, garbage and
    non-image data are rejected exactly as without ``size``."""
    jpg = encode(noisy_scene(480, 640)[..., ::-1], '.jpg')
    png = encode(smooth_rgb()[..., ::-1], '.png')
    for data, reason in ((jpg[:len(jpg) // 2], 'bad_compressed'),
                         (jpg[:len(jpg) - 2], 'bad_compressed'),
                         (b'\xff\xd8' + rng.bytes(400), 'bad_compressed'),
                         (png[:len(png) // 2], 'bad_compressed'),
                         (rng.bytes(500), 'bad_format'), (b'', 'empty')):
        rejected(reason, compressed_msg_to_rgb, comp_msg(data), size=64)
    rejected('too_large', compressed_msg_to_rgb, comp_msg(jpg), max_pixels=640 * 480 - 1,
             size=64)
    rejected('too_large', image_msg_to_rgb, raw_msg('rgb8', 480, 640, 1920, bytes(921600)),
             max_pixels=1000, size=64)
    rejected('short_data', image_msg_to_rgb, raw_msg('bgr8', 48, 64, 192, bytes(100)), size=16)
    with pytest.raises(ValueError, match='size'):
        image_msg_to_rgb(raw_msg('bgr8', 2, 2, 6, bytes(12)), size=-1)

    def no_decode(*args, **kwargs):
        raise AssertionError('imdecode must not be called for an oversized image')

    monkeypatch.setattr(image_codec.cv2, 'imdecode', no_decode)
    exc = rejected('too_large', compressed_msg_to_rgb,
                   comp_msg(_set_jpeg_size(jpg, 60000, 60000)), size=64)
    assert '60000x60000' in str(exc)


def test_reduced_decode_larger_than_its_header_is_refused(monkeypatch):
    """A decoder that disagrees with the header it was checked by (a reduced decode bigger
    than header / factor) is refused, as a full decode bigger than max_pixels is."""
    jpg = encode(noisy_scene(480, 640)[..., ::-1], '.jpg')
    monkeypatch.setattr(image_codec.cv2, 'imdecode',
                        lambda buf, flags: np.zeros((480, 640, 3), np.uint8))
    exc = rejected('too_large', compressed_msg_to_rgb, comp_msg(jpg), size=128)
    assert '1/2 scale' in str(exc)
