"""The node's inputs: camera frames (decoded on arrival, classified on the inference thread,
published), labelled images, live teaching and forget requests (mixed into the node)."""
from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import numpy as np
from rclpy.logging import LoggingSeverity
from sensor_msgs.msg import Image
from std_msgs.msg import String

from ..learning.image_resize import resize_image
from ..learning.types import Prediction
from .callbacks import error_reply, guarded_callback
from .diagnostics import BAD_LABEL
from .image_codec import ImageRejected, compressed_msg_to_rgb, draw_label, image_msg_to_rgb
from .sample_buffer import validate_label
from .vision_msgs_bridge import classification_message, hypotheses

__all__ = ['Frame', 'InputsMixin', 'prediction_record']


@dataclass
class Frame:
    """A camera frame on its way to the model: decoded and resized on arrival."""

    topic: str
    header: Any
    received: float
    rgb: np.ndarray                     # the model input, image_size x image_size RGB
    full: Optional[np.ndarray] = None   # the whole frame, kept only for ~/debug_image


def prediction_record(pred: Prediction, header: Any, source: str, latency_ms: float
                      ) -> Dict[str, Any]:
    """The JSON object published on ``~/predictions`` for one classified frame."""
    return {
        'stamp': {'sec': int(header.stamp.sec), 'nanosec': int(header.stamp.nanosec)},
        'frame_id': header.frame_id, 'source': source, 'label': pred.label,
        'score': float(pred.score), 'known': bool(pred.known),
        'novelty': float(pred.novelty), 'task_id': int(pred.task_id),
        'topk': [{'label': label, 'score': float(score)} for label, score in pred.topk],
        'latency_ms': latency_ms, 'model_version': int(pred.model_version),
        'runtime': pred.runtime, 'provider': pred.provider,
    }


class InputsMixin:
    """The node's input callbacks and the inference thread's work."""

    def _camera_callback(self, index: int, compressed: bool) -> Callable[[Any], None]:
        """The callback of camera ``index`` (runs on the camera thread)."""
        @guarded_callback('camera')
        def callback(self: Any, msg: Any) -> None:
            now = time.monotonic()
            topic = self._camera_topics[index]
            self._worker.count_received(now)
            # Decoded here, on the camera thread, straight to the model input (OpenCV releases
            # the GIL, so this overlaps with the model on the inference thread); the whole
            # frame only while someone watches ~/debug_image.
            size = self.learner.config.image_size
            full = None
            if self._debug_pub.get_subscription_count() > 0:
                full = self._decode(msg, compressed, topic, 'camera')
                rgb = None if full is None else resize_image(full, size)
            else:
                rgb = self._decode(msg, compressed, topic, 'camera', size=size)
            if rgb is not None:
                self._worker.submit(topic, Frame(topic, msg.header, now, rgb, full), now,
                                    counted=True)
        return functools.partial(callback, self)

    def _decode(self, msg: Any, compressed: bool, source: str, kind: str, *, size: int = 0
                ) -> Optional[np.ndarray]:
        """The RGB image of ``msg`` (``size`` x ``size`` when ``size``), or None when it is
        rejected (counted and logged)."""
        max_pixels = self._values['max_image_pixels']
        try:
            if compressed:
                return compressed_msg_to_rgb(msg, max_pixels, size=size)
            return image_msg_to_rgb(msg, max_pixels, size=size)
        except ImageRejected as exc:
            self._reject(exc.reason, source, kind, str(exc))
        except Exception as exc:  # noqa: BLE001 - no malformed message may kill the node
            self._reject('bad_format', source, kind, error_reply(exc))
        return None

    def _reject(self, reason: str, source: str, kind: str, detail: str) -> None:
        with self._stats.lock:
            self._stats.rejected[reason] += 1
            self._stats.rejected_by_input[kind] += 1
        self.get_logger().warning(f'dropped a bad message on {source}: {detail}',
                                  throttle_duration_sec=5.0)

    @guarded_callback('~/labelled_images')
    def _on_labelled(self, msg: Any, compressed: bool) -> None:
        with self._stats.lock:
            self._stats.labelled_received += 1
        source = self._labelled_topics[1 if compressed else 0]
        try:
            label = validate_label(msg.header.frame_id)
        except ValueError as exc:
            self._reject(BAD_LABEL, source, 'labelled', f'label refused: {exc}')
            return
        rgb = self._decode(msg, compressed, source, 'labelled')
        if rgb is None:
            return
        dropped = self.buffer.add(rgb, label)
        with self._stats.lock:
            self._stats.labelled_accepted += 1
        self.get_logger().debug(f'buffered a labelled image of {label!r} ({len(self.buffer)} '
                                'in the buffer)', throttle_duration_sec=1.0)
        if dropped:
            self.get_logger().warning(
                f'sample buffer full: dropped {dropped} oldest sample(s) (limits '
                f'max_samples_per_class / max_buffer_samples)', throttle_duration_sec=5.0)

    @guarded_callback('~/teach')
    def _on_teach(self, msg: String) -> None:
        text = msg.data if isinstance(msg.data, str) else ''
        if not text.strip():
            was = self._teach.stop()
            if was is not None:
                self.get_logger().info(f'stopped teaching {was!r}')
            return
        try:
            label = validate_label(text)
        except ValueError as exc:
            self._reject(BAD_LABEL, self._teach_topic, 'teach', f'label refused: {exc}')
            return
        timeout_s = self._values['teach_timeout_s']
        self._teach.start(label, timeout_s, time.monotonic())
        self.get_logger().info(
            f'teaching {label!r}: camera frames go to the buffer at '
            f"{self._values['teach_rate_hz']} Hz for up to {timeout_s} s (empty string stops)")

    def _teaching(self, now: float) -> Optional[str]:
        label, expired = self._teach.current(now)
        if expired is not None:
            self.get_logger().info(f'stopped teaching {expired!r}: teach_timeout_s reached')
        return label

    @guarded_callback('~/forget')
    def _on_forget(self, msg: String) -> None:
        try:
            ok, reply = self._model.forget(validate_label(msg.data))
        except ValueError as exc:
            ok, reply = False, {'error': f'label refused: {exc}'}
        if not ok:
            with self._stats.lock:
                self._stats.forget_refused += 1
            self.get_logger().warning(f"~/forget: {reply['error']}")

    def _process(self, frames: List[Frame]) -> None:
        """Teach, classify one batch (one frame per camera at most) and publish (on the
        inference thread; the frames were decoded on arrival)."""
        now = time.monotonic()
        for frame in frames:
            self._maybe_teach(frame.rgb, now)
        if not frames or not self.learner.classes:
            return
        started = time.monotonic()
        predictions = self.learner.predict([f.rgb for f in frames],
                                           top_k=self._values['top_k'])
        if self.get_logger().is_enabled_for(LoggingSeverity.DEBUG):  # not built per batch
            self.get_logger().debug(
                f'classified {len(frames)} frame(s) in {(time.monotonic() - started) * 1e3:.1f}'
                f' ms ({predictions[0].runtime}): ' + ', '.join(
                    f'{f.topic} -> {p.label} {p.score:.2f}' for f, p in zip(frames, predictions)),
                throttle_duration_sec=1.0)
        want_debug = self._debug_pub.get_subscription_count() > 0
        vision = self._classification_pub if self._values['publish_vision_msgs'] else None
        for frame, pred in zip(frames, predictions):
            latency_ms = (time.monotonic() - frame.received) * 1000.0
            record = prediction_record(pred, frame.header, frame.topic, latency_ms)
            self._predictions_pub.publish(String(data=json.dumps(record)))
            if vision is not None:
                vision.publish(classification_message(
                    frame.header, hypotheses(pred.label, pred.score, pred.known, pred.topk),
                    self._vision))
            with self._stats.lock:
                self._stats.classified += 1
                self._stats.latencies_ms.append(latency_ms)
                self._stats.prompt_selected[int(pred.task_id)] += 1
                self._stats.unknown_frames += not pred.known
                self._stats.classifications += vision is not None
            if want_debug:
                self._publish_debug(frame, pred.label, pred.score)

    def _maybe_teach(self, rgb: np.ndarray, now: float) -> None:
        if self._teaching(now) is None:
            return
        label = self._teach.take_sample(now, self._values['teach_rate_hz'])
        if label is not None:
            self.buffer.add(rgb, label)
            with self._stats.lock:
                self._stats.teach_samples += 1

    def _publish_debug(self, frame: Frame, label: str, score: float) -> None:
        # A frame that arrived before the first debug subscriber has only the model input.
        bgr = draw_label(frame.full if frame.full is not None else frame.rgb, label, score)
        msg = Image()
        msg.header = frame.header
        msg.height, msg.width = int(bgr.shape[0]), int(bgr.shape[1])
        msg.encoding = 'bgr8'
        msg.step = int(bgr.shape[1] * 3)
        msg.data = bgr.tobytes()
        self._debug_pub.publish(msg)
        with self._stats.lock:
            self._stats.debug_images += 1
