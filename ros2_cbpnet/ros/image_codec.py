"""Convert ROS image messages to RGB numpy arrays and back, with numpy and OpenCV only.

The PyPI ``cv_bridge`` is broken, so this module does the job itself. Decoding is meant to run
on every camera frame of a robot node: it validates every header field before touching the
pixel buffer, raises :class:`ImageRejected` (a ``ValueError``) with a stable ``reason`` key for
anything malformed, and otherwise returns a fresh C-contiguous ``(H, W, 3)`` uint8 RGB array
that never aliases the message buffer.

16-bit encodings (``rgb16``, ``bgr16``, ``rgba16``, ``bgra16``, ``mono16``/``16UC1``) are
reduced to 8 bit by keeping the high byte (``value >> 8``), honouring ``is_bigendian``. For
``mono16`` depth images this means 1 grey level per 256 units (256 mm for millimetre depth), so
near depth reads as almost black; that is deliberate: it is cheap, lossless for images written
by :func:`rgb_to_image_msg`, and a model that needs real depth must not go through RGB anyway.

Both decoders take an optional ``size``: the frame then comes out already resized to the
model's ``size`` x ``size`` input (:func:`ros2_cbpnet.learning.image_resize.resize_image`), the
cheap way round: raw 8-bit RGB/BGR(A)/mono frames are resized straight from the message buffer and
only the small result is colour-converted and copied, and a JPEG much larger than ``size`` is
decoded at 1/2, 1/4 or 1/8 scale by libjpeg itself (``IMREAD_REDUCED_*``: the DCT is scaled,
so the large image is never built). Every validation happens first, exactly as without
``size``. The reduced JPEG decode is never smaller than 1.5 ``size`` on either side, so it
only replaces part of an area shrink; the result stays within the tolerances of
:mod:`ros2_cbpnet.learning.image_resize` of a full decode followed by the reference resize.

``sensor_msgs`` is imported lazily, so decoding works (and the module imports) without ROS.
"""

from __future__ import annotations

from array import array
import copy
import operator
from typing import Any, Optional

import cv2
import numpy as np

from ..learning.image_resize import MIN_REMAINING_SHRINK, resize_image

__all__ = [
    'REASONS',
    'SUPPORTED_ENCODINGS',
    'ImageRejected',
    'compressed_msg_to_rgb',
    'draw_label',
    'image_msg_to_rgb',
    'jpeg_reduction',
    'rgb_to_compressed_msg',
    'rgb_to_image_msg',
]

REASONS: tuple[str, ...] = (
    'empty',
    'too_large',
    'unknown_encoding',
    'bad_step',
    'short_data',
    'long_data',
    'bad_compressed',
    'bad_format',
)


class ImageRejected(ValueError):
    """Raised for any input that cannot be turned into an image.

    ``reason`` is a short stable key from :data:`REASONS` (for diagnostics counters);
    ``str(exc)`` names the problem and the offending values.
    """

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f'unknown ImageRejected reason {reason!r}')
        super().__init__(f'image rejected ({reason}): {message}')
        self.reason = reason
        self.detail = message

    def __reduce__(self):
        # The default exception pickling would call __init__ with the formatted message only.
        return (type(self), (self.reason, self.detail))


# encoding -> (bytes per pixel, channels in the buffer, bytes per channel)
_RAW_LAYOUT: dict[str, tuple[int, int, int]] = {
    'rgb8': (3, 3, 1),
    'bgr8': (3, 3, 1),
    'rgba8': (4, 4, 1),
    'bgra8': (4, 4, 1),
    'mono8': (1, 1, 1),
    'mono16': (2, 1, 2),
    'rgb16': (6, 3, 2),
    'bgr16': (6, 3, 2),
    'rgba16': (8, 4, 2),
    'bgra16': (8, 4, 2),
    'yuv422': (2, 2, 1),
    'yuv422_yuy2': (2, 2, 1),
    'bayer_rggb8': (1, 1, 1),
    'bayer_bggr8': (1, 1, 1),
    'bayer_gbrg8': (1, 1, 1),
    'bayer_grbg8': (1, 1, 1),
}

# OpenCV-type and newer ROS 2 spellings that mean the same memory layout.
_ALIASES: dict[str, str] = {
    '8uc1': 'mono8',
    '8uc3': 'bgr8',
    '16uc1': 'mono16',
    'uyvy': 'yuv422',
    'yuyv': 'yuv422_yuy2',
}

# Channel order -> cvtColor code to RGB; None means the buffer already is RGB.
_TO_RGB: dict[str, Optional[int]] = {
    'rgb8': None,
    'rgb16': None,
    'bgr8': cv2.COLOR_BGR2RGB,
    'bgr16': cv2.COLOR_BGR2RGB,
    'rgba8': cv2.COLOR_RGBA2RGB,
    'rgba16': cv2.COLOR_RGBA2RGB,
    'bgra8': cv2.COLOR_BGRA2RGB,
    'bgra16': cv2.COLOR_BGRA2RGB,
    'mono8': cv2.COLOR_GRAY2RGB,
    'mono16': cv2.COLOR_GRAY2RGB,
    'yuv422': cv2.COLOR_YUV2RGB_UYVY,
    'yuv422_yuy2': cv2.COLOR_YUV2RGB_YUY2,
    # OpenCV names Bayer patterns after the 2x2 block starting at pixel (1, 1), not (0, 0),
    # so ROS 'rggb' is OpenCV 'BG' (the same mapping cv_bridge uses).
    'bayer_rggb8': cv2.COLOR_BayerBG2RGB,
    'bayer_bggr8': cv2.COLOR_BayerRG2RGB,
    'bayer_gbrg8': cv2.COLOR_BayerGR2RGB,
    'bayer_grbg8': cv2.COLOR_BayerGB2RGB,
}

SUPPORTED_ENCODINGS: tuple[str, ...] = tuple(_RAW_LAYOUT) + tuple(_ALIASES)

_PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
# Decode straight to RGB where OpenCV supports it (>= 4.11); ignore EXIF orientation like
# compressed_image_transport does, so the pixels match what the rest of ROS shows.
_IMREAD_RGB = getattr(cv2, 'IMREAD_COLOR_RGB', None)
_IMREAD_FLAGS = (cv2.IMREAD_COLOR if _IMREAD_RGB is None else _IMREAD_RGB) | getattr(
    cv2, 'IMREAD_IGNORE_ORIENTATION', 0)
# libjpeg's scaled decode: the "reduced" bit of IMREAD_REDUCED_GRAYSCALE_<f> (16, 32, 64)
# combined with the colour flags above (IMREAD_REDUCED_COLOR_<f> would mean BGR).
_JPEG_REDUCED = ((8, cv2.IMREAD_REDUCED_GRAYSCALE_8), (4, cv2.IMREAD_REDUCED_GRAYSCALE_4),
                 (2, cv2.IMREAD_REDUCED_GRAYSCALE_2))
# Raw encodings whose conversion to RGB only picks or repeats channels, so it commutes with
# resizing: these are resized in their own channel order, then converted (small) to RGB.
_CHANNEL_ONLY = frozenset(('rgb8', 'bgr8', 'rgba8', 'bgra8', 'mono8'))


def _as_int(value: Any, field: str, reason: str) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise ImageRejected(reason, f'{field} must be an integer, got {value!r:.40}') from None


def _as_uint8(data: Any) -> np.ndarray:
    """Flat uint8 array over a message payload: a view for buffers, a copy for int lists."""
    if isinstance(data, (bytes, bytearray, memoryview)) or (
            isinstance(data, array) and data.itemsize == 1):
        try:
            return np.frombuffer(data, dtype=np.uint8)
        except (ValueError, BufferError, TypeError):  # e.g. a non-contiguous memoryview
            raise ImageRejected('bad_format', 'data is not a contiguous byte buffer') from None
    if isinstance(data, np.ndarray) and data.dtype == np.uint8:
        return data.reshape(-1)
    if isinstance(data, (str, dict)) or data is None:
        raise ImageRejected(
            'bad_format', f'data must be a byte sequence, got {type(data).__name__}')
    # Lists (and other sequences) of ints: only values that fit a byte are meaningful.
    try:
        arr = np.asarray(data)
    except (TypeError, ValueError, OverflowError):
        arr = None
    if arr is None or arr.ndim != 1 or not (arr.dtype.kind in 'iub' or arr.size == 0):
        raise ImageRejected(
            'bad_format', f'data must be a byte sequence, got {type(data).__name__}')
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ImageRejected('bad_format', 'data contains values outside 0..255')
    return arr.astype(np.uint8, copy=False)


def _cvt(src: np.ndarray, code: int, encoding: str) -> np.ndarray:
    try:
        return cv2.cvtColor(src, code)
    except cv2.error as exc:
        # Unreachable for validated input; kept so a new OpenCV constraint cannot crash a node.
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else 'cv2.error'
        raise ImageRejected('bad_format', f'OpenCV cannot convert {encoding}: {msg}') from None


def _check_size(size: int) -> int:
    size = operator.index(size)
    if size < 0:
        raise ValueError(f'size must be >= 0 (0: no resize), got {size}')
    return size


def image_msg_to_rgb(msg: Any, max_pixels: int = 8_000_000, *, size: int = 0) -> np.ndarray:
    """Decode a ``sensor_msgs/Image`` (or duck-typed equivalent) to RGB uint8 ``(H, W, 3)``.

    Raises :class:`ImageRejected` for malformed input. The result is always a fresh
    C-contiguous array, never a view of ``msg.data``. 16-bit encodings keep the high byte.
    With ``size`` > 0 the result is ``(size, size, 3)``, resized as
    :func:`ros2_cbpnet.learning.image_resize.resize_image` does (8-bit RGB/BGR(A)/mono frames are
    resized before the colour conversion, which then touches only the small image).
    """
    size = _check_size(size)
    height = _as_int(getattr(msg, 'height', None), 'height', 'bad_format')
    width = _as_int(getattr(msg, 'width', None), 'width', 'bad_format')
    if height <= 0 or width <= 0:
        raise ImageRejected('empty', f'image is {width}x{height} (width x height)')
    if width * height > max_pixels:
        raise ImageRejected(
            'too_large', f'image is {width}x{height} = {width * height} pixels > {max_pixels}')

    raw_encoding = getattr(msg, 'encoding', None)
    if not isinstance(raw_encoding, str):
        raise ImageRejected(
            'unknown_encoding', f'encoding must be a string, got {raw_encoding!r:.40}')
    encoding = raw_encoding.strip().lower()
    encoding = _ALIASES.get(encoding, encoding)
    if encoding not in _RAW_LAYOUT:
        supported = ', '.join(SUPPORTED_ENCODINGS)
        raise ImageRejected(
            'unknown_encoding',
            f'unsupported encoding {raw_encoding!r:.40}; supported: {supported}')
    bpp, channels, depth = _RAW_LAYOUT[encoding]

    step = _as_int(getattr(msg, 'step', None), 'step', 'bad_step')
    row_bytes = width * bpp
    if step < row_bytes:
        raise ImageRejected(
            'bad_step',
            f'step {step} < width {width} * {bpp} bytes/pixel ({encoding}) = {row_bytes}')

    data = _as_uint8(getattr(msg, 'data', None))
    expected = step * height
    if data.size < expected:
        raise ImageRejected(
            'short_data',
            f'data has {data.size} bytes < step {step} * height {height} = {expected}')
    if data.size > expected:
        raise ImageRejected(
            'long_data',
            f'data has {data.size} bytes > step {step} * height {height} = {expected}')

    if encoding.startswith('yuv422') and width % 2:
        raise ImageRejected('bad_format', f'{encoding} packs pixel pairs; width {width} is odd')

    # Views only up to here; the single copy happens in cvtColor / the final copy().
    rows = data.reshape(height, step)[:, :row_bytes]
    if depth == 2:
        try:
            big = bool(getattr(msg, 'is_bigendian', 0))
        except (TypeError, ValueError):
            raise ImageRejected('bad_format', 'is_bigendian is not a boolean') from None
        rows = rows.reshape(height, width * channels, 2)[..., 0 if big else 1]
    pixels = rows.reshape(height, width, channels) if channels > 1 else rows

    code = _TO_RGB[encoding]
    if size and encoding in _CHANNEL_ONLY:
        # Resizing reads the message buffer in place; only size x size pixels are converted.
        pixels = resize_image(pixels, size)
        return pixels if code is None else _cvt(pixels, code, encoding)
    if code is None:
        rgb = np.array(pixels, dtype=np.uint8, order='C', copy=True)
    else:
        rgb = _cvt(pixels, code, encoding)
    # Bayer, YUV and 16-bit frames: converted at full size first (demosaicing and chroma
    # upsampling need the neighbours; the 16-bit high bytes are a strided view).
    return resize_image(rgb, size) if size else rgb


def _next_ff(data: np.ndarray, pos: int) -> int:
    """Index of the first 0xFF at or after ``pos`` (len(data) if none), searched vectorised."""
    n = data.size
    window = 4096
    while pos < n:
        hits = np.flatnonzero(data[pos:pos + window] == 0xFF)
        if hits.size:
            return pos + int(hits[0])
        pos += window
        window = min(window * 4, 1 << 22)
    return n


def _jpeg_size(data: np.ndarray, buf: memoryview) -> tuple[int, int]:
    """Return (width, height) from the first SOFn segment, walking markers like libjpeg."""
    n = len(buf)
    pos = 2  # after SOI, whose presence the caller checked
    while True:
        # libjpeg skips junk bytes and 0xFF fill bytes before a marker; do the same so that we
        # read the same SOF as the decoder will (otherwise the size guard could be bypassed).
        # (buf yields Python ints; numpy uint8 scalars would overflow in the shifts below.)
        if pos < n and buf[pos] != 0xFF:
            pos = _next_ff(data, pos)
        while pos < n and buf[pos] == 0xFF:
            pos += 1
        if pos >= n:
            raise ImageRejected('bad_compressed', 'JPEG ends before any SOF (frame) marker')
        marker = buf[pos]
        pos += 1
        if marker == 0x00 or marker == 0x01 or 0xD0 <= marker <= 0xD7:
            continue  # stuffed byte, TEM or RSTn: no length field
        if marker in (0xD8, 0xD9, 0xDA):
            raise ImageRejected(
                'bad_compressed', f'JPEG marker 0x{marker:02X} at byte {pos - 1} before SOF')
        if pos + 2 > n:
            raise ImageRejected('bad_compressed', 'JPEG truncated inside a marker segment')
        length = (buf[pos] << 8) | buf[pos + 1]
        if length < 2:
            raise ImageRejected('bad_compressed', f'JPEG segment length {length} < 2')
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if length < 8 or pos + 7 > n:
                raise ImageRejected('bad_compressed', 'JPEG truncated inside the SOF segment')
            height = (buf[pos + 3] << 8) | buf[pos + 4]
            width = (buf[pos + 5] << 8) | buf[pos + 6]
            return width, height
        pos += length


def _png_size(buf: memoryview) -> tuple[int, int]:
    if len(buf) < 24 or bytes(buf[12:16]) != b'IHDR':
        raise ImageRejected('bad_compressed', 'PNG does not start with an IHDR chunk')
    width = int.from_bytes(buf[16:20], 'big')
    height = int.from_bytes(buf[20:24], 'big')
    return width, height


def _has_jpeg_eoi(buf: memoryview) -> bool:
    # FF D9 cannot occur inside entropy-coded data (0xFF is byte-stuffed there), so its absence
    # means truncation. Older OpenCV returns grey-filled images for truncated JPEGs instead of
    # failing; this keeps the behaviour independent of the OpenCV build. Look at the tail
    # first: some cameras pad frames after EOI, which only costs a full scan in that case.
    tail = max(0, len(buf) - 4096)
    return b'\xff\xd9' in bytes(buf[tail:]) or (tail > 0 and b'\xff\xd9' in bytes(buf))


def _has_png_iend(buf: memoryview) -> bool:
    # Like _has_jpeg_eoi for PNG: a truncated PNG (the usual corruption) lacks the IEND chunk.
    # Rejecting it here also keeps libpng/OpenCV from printing an unthrottled warning to
    # stderr for every such frame (the node logs rejections itself, throttled). Tail first,
    # as some writers pad after IEND.
    tail = max(0, len(buf) - 4096)
    return b'IEND' in bytes(buf[tail:]) or (tail > 0 and b'IEND' in bytes(buf))


def jpeg_reduction(width: int, height: int, size: int) -> int:
    """The largest libjpeg scale-down factor (8, 4, 2; else 1) that divides both sides and
    leaves both at least ``MIN_REMAINING_SHRINK`` (1.5) times ``size``, so an area shrink by
    at least that much follows; 1 for ``size`` 0.

    The reduced decode is then never enlarged again and stays close to a full decode plus the
    reference resize. (A side the factor does not divide comes out as ``ceil(side /
    factor)``, a slightly different geometry: 481x641 at 1/4 drifted to a mean difference of
    2 grey levels.)"""
    if size <= 0:
        return 1
    least = MIN_REMAINING_SHRINK * size
    for factor, _ in _JPEG_REDUCED:
        if width % factor == 0 and height % factor == 0 and width // factor >= least \
                and height // factor >= least:
            return factor
    return 1


def compressed_msg_to_rgb(msg: Any, max_pixels: int = 8_000_000, *, size: int = 0
                          ) -> np.ndarray:
    """Decode a ``sensor_msgs/CompressedImage`` holding JPEG or PNG to RGB uint8 ``(H, W, 3)``.

    The container is sniffed from the data (``msg.format`` is informational only). The size
    in the JPEG/PNG header is checked against ``max_pixels`` before decoding, as a guard
    against decompression bombs. Grey, alpha and 16-bit PNGs come out as 8-bit RGB.
    With ``size`` > 0 the result is ``(size, size, 3)``: a JPEG at least three times ``size``
    on both sides is decoded at 1/2, 1/4 or 1/8 scale (:func:`jpeg_reduction`), then resized
    like :func:`ros2_cbpnet.learning.image_resize.resize_image`.
    """
    size = _check_size(size)
    data = _as_uint8(getattr(msg, 'data', None))
    if data.size == 0:
        raise ImageRejected('empty', 'compressed data is empty')
    buf = memoryview(data)
    fmt = getattr(msg, 'format', '')
    if bytes(buf[:2]) == b'\xff\xd8':
        kind = 'JPEG'
        width, height = _jpeg_size(data, buf)
    elif bytes(buf[:8]) == _PNG_MAGIC:
        kind = 'PNG'
        width, height = _png_size(buf)
    else:
        hint = ''
        if isinstance(fmt, str) and 'compresseddepth' in fmt.lower():
            hint = ' (compressedDepth is not supported)'
        raise ImageRejected(
            'bad_format', f'data is neither JPEG nor PNG: starts with {bytes(buf[:8]).hex()} '
            f'(format {fmt!r:.60}){hint}')
    if width <= 0 or height <= 0:
        raise ImageRejected('bad_compressed', f'{kind} header says {width}x{height}')
    if width * height > max_pixels:
        raise ImageRejected(
            'too_large',
            f'{kind} header says {width}x{height} = {width * height} pixels > {max_pixels}')
    if kind == 'JPEG' and not _has_jpeg_eoi(buf):
        raise ImageRejected('bad_compressed', f'JPEG of {len(buf)} bytes has no EOI (truncated)')
    if kind == 'PNG' and not _has_png_iend(buf):
        raise ImageRejected('bad_compressed', f'PNG of {len(buf)} bytes has no IEND (truncated)')

    factor = jpeg_reduction(width, height, size) if kind == 'JPEG' else 1
    flags = _IMREAD_FLAGS | dict(_JPEG_REDUCED).get(factor, 0)
    try:
        img = cv2.imdecode(data, flags)
    except cv2.error as exc:
        raise ImageRejected('bad_compressed', f'cv2.imdecode failed on {kind}: {exc}') from None
    if img is None or img.size == 0 or img.ndim != 3 or img.shape[2] != 3:
        raise ImageRejected(
            'bad_compressed', f'cv2.imdecode could not decode {len(buf)} bytes of {kind}')
    # Header/decoder disagreement: be safe.
    if img.shape[0] * img.shape[1] > max_pixels or (factor > 1 and (
            img.shape[0] > height // factor or img.shape[1] > width // factor)):
        raise ImageRejected('too_large', f'{kind} decoded to {img.shape[1]}x{img.shape[0]}'
                            + (f' at 1/{factor} scale' if factor > 1 else ''))
    if size:
        img = resize_image(img, size)
    if _IMREAD_RGB is None:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(img)


def _check_rgb(rgb: Any) -> np.ndarray:
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8:
        raise ValueError(f'expected a uint8 array, got dtype {arr.dtype}')
    if arr.ndim == 2:
        arr = cv2.cvtColor(arr, cv2.COLOR_GRAY2RGB)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f'expected an (H, W, 3) RGB array, got shape {arr.shape}')
    return np.ascontiguousarray(arr)


def _set_header(msg: Any, header: Any) -> None:
    if header is not None:
        msg.header = copy.deepcopy(header)


def rgb_to_image_msg(rgb: np.ndarray, encoding: str = 'bgr8', header: Any = None) -> Any:
    """Build a ``sensor_msgs/Image`` from an RGB uint8 ``(H, W, 3)`` array (or ``(H, W)`` grey).

    ``encoding`` is one of rgb8, bgr8, mono8, rgba8, bgra8 (alpha 255) or mono16 (grey * 257,
    little-endian, so the high byte is the grey value and decoding round-trips exactly).
    """
    from sensor_msgs.msg import Image

    arr = _check_rgb(rgb)
    enc = encoding.strip().lower() if isinstance(encoding, str) else encoding
    if enc == 'rgb8':
        out = arr
    elif enc == 'bgr8':
        out = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    elif enc == 'rgba8':
        out = cv2.cvtColor(arr, cv2.COLOR_RGB2RGBA)
    elif enc == 'bgra8':
        out = cv2.cvtColor(arr, cv2.COLOR_RGB2BGRA)
    elif enc == 'mono8':
        out = cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY)
    elif enc == 'mono16':
        out = (cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY).astype(np.uint16) * 257).astype('<u2')
    else:
        raise ValueError(
            f'cannot build Image with encoding {encoding!r}; '
            'use rgb8, bgr8, mono8, rgba8, bgra8 or mono16')
    msg = Image()
    _set_header(msg, header)
    msg.height, msg.width = int(arr.shape[0]), int(arr.shape[1])
    msg.encoding = enc
    msg.is_bigendian = 0
    msg.step = int(out.strides[0])
    msg.data = out.tobytes()
    return msg


def rgb_to_compressed_msg(
        rgb: np.ndarray, fmt: str = 'jpeg', header: Any = None, quality: int = 90) -> Any:
    """Build a ``sensor_msgs/CompressedImage`` (format ``'jpeg'`` or ``'png'``) from RGB."""
    from sensor_msgs.msg import CompressedImage

    arr = _check_rgb(rgb)
    kind = fmt.strip().lower() if isinstance(fmt, str) else fmt
    if kind in ('jpeg', 'jpg'):
        if not 0 <= int(quality) <= 100:
            raise ValueError(f'JPEG quality must be in 0..100, got {quality}')
        kind, ext, params = 'jpeg', '.jpg', [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    elif kind == 'png':
        ext, params = '.png', []
    else:
        raise ValueError(f"cannot build CompressedImage with format {fmt!r}; use 'jpeg' or 'png'")
    ok, encoded = cv2.imencode(ext, cv2.cvtColor(arr, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ValueError(f'cv2.imencode({ext!r}) failed for shape {arr.shape}')
    msg = CompressedImage()
    _set_header(msg, header)
    msg.format = kind
    msg.data = encoded.tobytes()
    return msg


def draw_label(rgb: np.ndarray, text: str, score: Optional[float] = None) -> np.ndarray:
    """Return a BGR uint8 copy of ``rgb`` with a filled banner showing ``text`` (and score).

    Hershey fonts are ASCII-only, so other characters are drawn as ``'?'``.
    """
    bgr = cv2.cvtColor(_check_rgb(rgb), cv2.COLOR_RGB2BGR)
    height, width = bgr.shape[:2]
    label = ''.join(ch if ' ' <= ch <= '~' else '?' for ch in str(text))
    if score is not None:
        label = f'{label} {float(score):.2f}'

    font = cv2.FONT_HERSHEY_SIMPLEX
    banner = min(height, max(12, round(height * 0.07)))
    thickness = max(1, banner // 16)
    scale = cv2.getFontScaleFromHeight(font, max(1, int(banner * 0.6)), thickness)
    (text_w, _), _ = cv2.getTextSize(label, font, scale, thickness)
    if text_w > width - 4 and text_w > 0:
        # Shrink long labels to the image width rather than cutting them off.
        scale *= max(0.1, (width - 4) / text_w)
    cv2.rectangle(bgr, (0, 0), (width - 1, banner - 1), (0, 0, 0), thickness=cv2.FILLED)
    baseline_y = max(1, banner - max(2, banner // 5))
    cv2.putText(bgr, label, (2, baseline_y), font, scale, (255, 255, 255), thickness,
                cv2.LINE_AA)
    return bgr
