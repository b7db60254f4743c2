"""Launch cbpnet_node with a parameters file.

    ros2 launch ros2_cbpnet cbpnet.launch.py [config:=FILE] [namespace:=NS]
        [image_topic:=TOPIC] [backbone:=NAME] [device:=auto|cpu|cuda]

``config`` defaults to the package's config/cbpnet.yaml. ``image_topic``, ``backbone`` and
``device`` are optional overrides of the parameters ``image_topics`` (as a one-topic list),
``backbone`` and ``device``: left empty (the default) they keep the value from ``config``.
Works with ROS 2 Humble and later.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def _cbpnet_node(context, *args, **kwargs):
    """The node, with only the overrides that were given on the command line."""
    overrides = {}
    image_topic = LaunchConfiguration('image_topic').perform(context).strip()
    if image_topic:
        overrides['image_topics'] = [image_topic]
    for name in ('backbone', 'device'):
        value = LaunchConfiguration(name).perform(context).strip()
        if value:
            overrides[name] = value
    parameters = [LaunchConfiguration('config').perform(context)]
    if overrides:
        parameters.append(overrides)  # later entries win over the file
    return [Node(
        package='ros2_cbpnet',
        executable='cbpnet_node',
        name='cbpnet',
        namespace=LaunchConfiguration('namespace').perform(context),
        parameters=parameters,
        output='screen',
        emulate_tty=True,
    )]


def generate_launch_description():
    default_config = os.path.join(
        get_package_share_directory('ros2_cbpnet'), 'config', 'cbpnet.yaml')
    return LaunchDescription([
        DeclareLaunchArgument('config', default_value=default_config,
                              description='parameters YAML of the cbpnet node'),
        DeclareLaunchArgument('namespace', default_value='',
                              description='namespace of the node'),
        DeclareLaunchArgument('image_topic', default_value='',
                              description='camera topic; overrides image_topics when set'),
        DeclareLaunchArgument('backbone', default_value='',
                              description='timm backbone name; overrides the config when set'),
        DeclareLaunchArgument('device', default_value='',
                              description='auto, cpu or cuda; overrides the config when set'),
        OpaqueFunction(function=_cbpnet_node),
    ])
