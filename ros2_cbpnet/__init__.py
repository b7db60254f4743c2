"""ros2_cbpnet: on-robot continual learning of new image classes with CBPNet.

Two halves, and data flows one way (the ROS side may import the learning side, never back):

- :mod:`ros2_cbpnet.learning` — the method, with no ROS import anywhere: frozen backbones,
  prompts, the CBP block and the class statistics (``learning.model``), the continual
  learner, its configuration, training, checkpoints, the frozen pass in ONNX Runtime, the
  fleet's contribution format, data sets, metrics and the evaluation baselines.
- :mod:`ros2_cbpnet.ros` — the node: parameters, topics, services, diagnostics, camera
  input, the inference thread, model changes one at a time, live teaching, the image codec
  of ``sensor_msgs``, ``vision_msgs`` output, logging to ``/rosout``, the fleet link.

:mod:`ros2_cbpnet.tools` holds the command-line tools around them (``cbpnet-eval`` on the
learning side; ``cbpnet-bench`` and ``cbpnet-demo``, which also drive the node).
"""
__version__ = '0.1.0'
