"""The learning side of ros2_cbpnet: everything that learns and predicts, with no ROS import
(a test keeps it so). The node (:mod:`ros2_cbpnet.ros`), the evaluation and the benchmark
all drive :class:`~ros2_cbpnet.learning.learner.ContinualLearner`."""
