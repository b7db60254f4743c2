"""Launch cbpnet_node with a parameters file.

    ros2 launch ros2_cbpnet cbpnet.launch.py [config:=FILE] [namespace:=NS]
        [image_topic:=TOPIC] [image_qos:=sensor_data|reliable] [log_level:=LEVEL]
        [backbone:=NAME] [device:=auto|cpu|cuda] [checkpoint_dir:=DIR]
        [recipe:=custom|paper] [lifecycle:=false|true]

- ``config``: a parameters YAML, default the package's config/cbpnet.yaml. A path that does
  not exist stops the launch with an error (ros2 launch would otherwise only warn and start
  the node on built-in defaults).
- ``image_topic``: the camera, by remapping the node's relative default topic ``image``
  (as image_proc and ros_deep_learning do); a name ending in ``/compressed`` is subscribed as
  ``CompressedImage``. Empty (the default): ``image`` in the node's namespace. It only applies
  while ``image_topics`` in the config is the default ``['image']``.
- ``image_qos``: camera QoS, overriding the config: ``reliable`` for a raw camera on the same
  computer, ``sensor_data`` (best effort) for a driver that only offers best effort or a
  camera on another machine. A reliable subscriber receives nothing from a best-effort
  publisher. Empty: the config's value.
- ``log_level``: the node's log level (debug, info, warn, error, fatal).
- ``backbone``, ``device``, ``checkpoint_dir``, ``recipe``: overrides of those parameters;
  empty keeps the config's value (so the checkpoints can move without copying the YAML).
- ``lifecycle``: ``true`` starts ``cbpnet_lifecycle_node``, the same node as a managed
  (lifecycle) node that waits unconfigured for configure and activate (a lifecycle manager,
  or ``ros2 lifecycle set``); ``false`` (default) ``cbpnet_node``, which starts active.

Works with ROS 2 Humble and later.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


class ConfigFileNotFound(FileNotFoundError):
    """``config:=`` names a file that does not exist."""


def _cbpnet_node(context, *args, **kwargs):
    """The node, with only the overrides that were given on the command line."""
    def arg(name):
        return LaunchConfiguration(name).perform(context).strip()

    config = os.path.expanduser(arg('config'))
    if not os.path.isfile(config):
        raise ConfigFileNotFound(
            f"cbpnet.launch.py: config:='{config}' is not a file; give the path of a "
            "parameters YAML (the package's own is config/cbpnet.yaml in its share directory)")
    overrides = {name: arg(name) for name in ('image_qos', 'backbone', 'device',
                                              'checkpoint_dir', 'recipe') if arg(name)}
    parameters = [config] + ([overrides] if overrides else [])  # later entries win
    image_topic = arg('image_topic')
    managed = arg('lifecycle').lower() in ('true', '1', 'yes')
    return [Node(
        package='ros2_cbpnet',
        executable='cbpnet_lifecycle_node' if managed else 'cbpnet_node',
        name='cbpnet',
        namespace=arg('namespace'),
        parameters=parameters,
        remappings=[('image', image_topic)] if image_topic else [],
        ros_arguments=['--log-level', arg('log_level')],
        output='screen',
        emulate_tty=True,
    )]


def generate_launch_description():
    """The launch arguments and the node."""
    default_config = os.path.join(
        get_package_share_directory('ros2_cbpnet'), 'config', 'cbpnet.yaml')
    return LaunchDescription([
        DeclareLaunchArgument('config', default_value=default_config,
                              description='parameters YAML of the cbpnet node'),
        DeclareLaunchArgument('namespace', default_value='',
                              description='namespace of the node'),
        DeclareLaunchArgument('image_topic', default_value='',
                              description='camera topic the relative topic "image" is '
                                          'remapped to (.../compressed = CompressedImage); '
                                          'empty = "image" in the namespace'),
        DeclareLaunchArgument('image_qos', default_value='',
                              choices=['', 'sensor_data', 'reliable'],
                              description='camera QoS: reliable for a raw camera on this '
                                          'computer, sensor_data (best effort) otherwise; '
                                          'empty = the config value'),
        DeclareLaunchArgument('log_level', default_value='info',
                              choices=['debug', 'info', 'warn', 'error', 'fatal'],
                              description='log level of the node'),
        DeclareLaunchArgument('backbone', default_value='',
                              description='timm backbone name; overrides the config when set'),
        DeclareLaunchArgument('device', default_value='',
                              description='auto, cpu or cuda; overrides the config when set'),
        DeclareLaunchArgument('checkpoint_dir', default_value='',
                              description='where checkpoints are kept; overrides the config '
                                          'when set'),
        DeclareLaunchArgument('lifecycle', default_value='false',
                              choices=['false', 'true'],
                              description='true = the managed (lifecycle) node, which waits '
                                          'for configure and activate'),
        DeclareLaunchArgument('recipe', default_value='', choices=['', 'custom', 'paper'],
                              description='paper = the published CBPNet; overrides the config '
                                          'when set'),
        OpaqueFunction(function=_cbpnet_node),
    ])
