"""Command-line tools: ``cbpnet-eval`` (learning side only, no ROS), ``cbpnet-bench`` and
``cbpnet-demo`` (which also start the node), and the ROS domain lock the Makefile uses."""
