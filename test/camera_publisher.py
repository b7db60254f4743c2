"""A camera driver stand-in for cross-process tests: publishes JPEG ``CompressedImage`` frames
with the sensor-data QoS camera drivers use (best effort, depth 5 in rclpy's profile).

    python test/camera_publisher.py TOPIC RATE_HZ SPEC [SPEC ...]

Each SPEC is ``frame_id=R,G,B``: a 64x64 frame of that colour plus seeded noise, published in
turn with its ``header.frame_id``. It waits until a subscription matches, prints ``ready``,
and publishes until its standard input is closed, then prints ``sent N`` and exits 0. Runs in
whatever ROS domain the environment names.
"""
import sys
import threading
import time

import numpy as np
import rclpy
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage

from ros2_cbpnet.ros.image_codec import rgb_to_compressed_msg


def main(argv):
    """Publish until stdin closes; exit 1 if no subscriber appears within 60 s."""
    topic, rate_hz, specs = argv[0], float(argv[1]), argv[2:]
    rng = np.random.default_rng(0)
    messages = []
    for spec in specs:
        frame_id, colour = spec.split('=')
        rgb = np.clip(rng.normal([int(c) for c in colour.split(',')], 30, (64, 64, 3)), 0, 255)
        msg = rgb_to_compressed_msg(rgb.astype(np.uint8), 'jpeg')
        msg.header.frame_id = frame_id
        messages.append(msg)
    rclpy.init()
    node = rclpy.create_node('cbpnet_test_camera')
    publisher = node.create_publisher(CompressedImage, topic, qos_profile_sensor_data)
    deadline = time.monotonic() + 60
    while publisher.get_subscription_count() == 0:
        if time.monotonic() > deadline:
            print('no subscriber', flush=True)
            return 1
        time.sleep(0.05)
    print('ready', flush=True)
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    sent = 0
    while not stop.is_set():
        msg = messages[sent % len(messages)]
        msg.header.stamp = node.get_clock().now().to_msg()
        publisher.publish(msg)
        sent += 1
        stop.wait(1.0 / rate_hz)
    print(f'sent {sent}', flush=True)
    node.destroy_node()
    rclpy.shutdown()
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
