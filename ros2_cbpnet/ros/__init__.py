"""The ROS 2 side of ros2_cbpnet: the ``cbpnet_node`` (plain and lifecycle), thin glue around
the learning side (:mod:`ros2_cbpnet.learning`), which it imports and never the reverse."""
