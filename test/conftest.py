"""Test-wide settings, applied at import time, before any test module imports rclpy.

DDS must stay on this machine (docs/environment.md) and each test run gets its own ROS
domain so parallel runs by other people on the same host do not see each other's nodes.
"""
import os
import sys

os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
# Derived from the pid: distinct for concurrent runs, in 1..100 (valid for Fast DDS ports).
os.environ.setdefault('ROS_DOMAIN_ID', str(os.getpid() % 100 + 1))
# The PyPI ROS wheels do not set it; ament_index_python needs it.
os.environ.setdefault('AMENT_PREFIX_PATH', sys.prefix)
# No model hub is reachable here; fail fast instead of waiting for network timeouts.
os.environ['HF_HUB_OFFLINE'] = '1'
# Let the tests import their shared helpers (test/ros_helpers.py) as a plain module.
sys.path.insert(0, os.path.dirname(__file__))
