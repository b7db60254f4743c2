"""ros2_cbpnet: on-robot continual learning of new image classes with CBPNet."""
__version__ = '0.1.0'
