"""``~/classification`` and ``~/vision_info`` through the node, with vision_msgs present.

No vision_msgs wheel exists on PyPI, so the node (in-process, real DDS on loopback) gets the
stand-in message classes of test_node_parts (the vision_msgs 4.x fields) from its
``load_vision_msgs``, and its publishers of those two types are recording fakes (rclpy cannot
create a publisher of a type that is not a ROS message); every other publisher is real. What
the node hands those publishers is compared with its JSON on ``~/predictions``.
"""
import threading

import numpy as np
import pytest

from ros2_cbpnet.ros.node import CBPNetNode
from ros2_cbpnet.ros.vision_msgs_bridge import method_name
from ros_helpers import LATCHED, noisy_images, node_in_process
from test_node_parts import FAKE

pytestmark = [pytest.mark.ros]

CAM = '/cbpnet_vision/cam/image_raw'
RED, BLUE = (200, 40, 40), (40, 40, 200)


class RecordingPublisher:
    """Stands in for an rclpy publisher of a stand-in message type: keeps what is published."""

    def __init__(self, msg_type, topic, qos):
        self.msg_type, self.topic, self.qos = msg_type, topic, qos
        self.messages = []
        self._lock = threading.Lock()

    def publish(self, msg):
        assert isinstance(msg, self.msg_type), (type(msg), self.msg_type)
        with self._lock:
            self.messages.append(msg)

    def snapshot(self):
        with self._lock:
            return list(self.messages)

    def get_subscription_count(self):
        return 0


def _params():
    return dict(prediction='task', min_steps=0, unknown_threshold=0.0, image_size=64,
                epochs=3, batch_size=4, min_samples_per_class=3, diagnostics_period_s=0.2,
                image_qos='reliable', image_topics=[CAM], checkpoint_dir='', top_k=5)


def _expected_results(prediction):
    """``(class_id, score)`` pairs the Classification of a JSON prediction must carry: the
    top-k, led by the unknown label when the frame is unlike anything taught."""
    pairs = [(t['label'], t['score']) for t in prediction['topk']]
    if not prediction['known']:
        pairs.insert(0, (prediction['label'], prediction['score']))
    return pairs


def test_classification_and_vision_info_are_published_with_vision_msgs(monkeypatch):
    monkeypatch.setattr('ros2_cbpnet.ros.node_core.load_vision_msgs', lambda: (FAKE, ''))
    fakes = {}
    create_publisher = CBPNetNode.create_publisher

    def recording_create_publisher(self, msg_type, topic, qos, **kwargs):
        if msg_type in (FAKE.Classification, FAKE.VisionInfo):
            fakes[msg_type] = RecordingPublisher(msg_type, self.resolve_topic_name(topic), qos)
            return fakes[msg_type]
        return create_publisher(self, msg_type, topic, qos, **kwargs)

    monkeypatch.setattr(CBPNetNode, 'create_publisher', recording_create_publisher)
    with node_in_process(_params(), namespace='/vis') as h:
        c, node = h.client, h.node
        classification, info = fakes[FAKE.Classification], fakes[FAKE.VisionInfo]
        assert classification.topic == '/vis/cbpnet/classification'
        assert info.topic == '/vis/cbpnet/vision_info'
        assert info.qos.durability == LATCHED.durability  # latched, like ~/labels
        # At start: the (empty) model is described already.
        assert [m.database_version for m in info.snapshot()] == [0]

        rng = np.random.default_rng(0)
        c.teach_and_learn({'red': noisy_images(RED, 5, rng=rng),
                           'blue': noisy_images(BLUE, 5, rng=rng)})

        # ~/vision_info after learning: the model version, where the labels are, the method.
        first, latest = info.snapshot()[0], info.snapshot()[-1]
        assert latest.database_version == node.learner.model_version
        assert latest.database_version == first.database_version + 1
        assert latest.database_location == '/vis/cbpnet/class_labels'
        assert latest.database_location.endswith('/class_labels')
        assert latest.method == method_name(node.learner.config)
        assert latest.method.startswith('CBPNet on tf_efficientnet_lite0 (selection ')
        assert (latest.header.stamp.sec, latest.header.stamp.nanosec) != (0, 0)

        # ~/classification: the classified image's header, results = the JSON prediction.
        predictions = c.collect('~/predictions')
        red = c.classify(CAM, noisy_images(RED, 1, rng=rng)[0], 'vision_probe', predictions,
                         stamp=(123, 456))
        assert red['label'] == 'red' and red['known'] is True
        assert red['model_version'] == latest.database_version
        probes = [m for m in classification.snapshot() if m.header.frame_id == 'vision_probe']
        assert probes, 'no Classification for the classified frame'
        msg = probes[0]
        assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (123, 456)
        assert all(type(r) is FAKE.ObjectHypothesis for r in msg.results)
        assert msg.results[0].class_id == red['label']
        assert [(r.class_id, r.score) for r in msg.results] == _expected_results(red)
        assert [r.score for r in msg.results] == [t['score'] for t in red['topk']]

        # A frame unlike anything taught: results[0] is the unknown label, then the top-k.
        odd_rgb = np.random.default_rng(7).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        known = c.classify(CAM, noisy_images(RED, 1, rng=rng)[0], 'vision_known', predictions)
        odd = c.classify(CAM, odd_rgb, 'vision_odd_known', predictions)
        assert odd['novelty'] > max(known['novelty'], 0.0) + 0.5, (known, odd)
        assert c.set_parameters({'unknown_threshold': max(known['novelty'], 0.0) + 0.25,
                                 'unknown_label': 'no idea'})[0].successful
        unknown = c.classify(CAM, odd_rgb, 'vision_unknown', predictions)
        assert unknown['label'] == 'no idea' and unknown['known'] is False
        msg = [m for m in classification.snapshot() if m.header.frame_id == 'vision_unknown'][0]
        assert [(r.class_id, r.score) for r in msg.results] == _expected_results(unknown)
        assert msg.results[0].class_id == 'no idea'
        assert [r.class_id for r in msg.results[1:]] == [t['label'] for t in unknown['topk']]

        # Diagnostics: published, one Classification per classified frame.
        _, values = c.wait_for_status(
            'cbpnet: inference', lambda level, v: int(v['classifications_published'])
            == len(classification.snapshot()) and int(v['frames_classified'])
            == len(classification.snapshot()), 30)
        assert values['vision_msgs'] == 'published'

        # publish_vision_msgs false at run time: no more Classification, diagnostics say off.
        assert c.set_parameters({'publish_vision_msgs': False})[0].successful
        count = len(classification.snapshot())
        c.classify(CAM, noisy_images(BLUE, 1, rng=rng)[0], 'vision_off', predictions)
        assert c.wait_for_status('cbpnet: inference',
                                 lambda level, v: v['vision_msgs'] == 'off', 30)
        assert len(classification.snapshot()) == count
        predictions.close()
