"""Command-line tools around the learner (no ROS needed): ``cbpnet-eval`` and friends."""
