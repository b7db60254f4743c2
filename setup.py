"""ament_python package definition for ros2_cbpnet."""
from glob import glob

from setuptools import find_packages, setup

PACKAGE = 'ros2_cbpnet'

setup(
    name=PACKAGE,
    version='0.1.0',
    packages=find_packages(exclude=['test']),
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + PACKAGE]),
        ('share/' + PACKAGE, ['package.xml']),
        ('share/' + PACKAGE + '/launch', glob('launch/*.launch.py')),
        ('share/' + PACKAGE + '/config', glob('config/*.yaml')),
    ],
    # Deliberately nothing but setuptools: on a robot rclpy and the messages come from the apt
    # ROS 2 install and torch from the vendor (JetPack on a Jetson); pip must never replace them.
    # Plain machines get everything from requirements.txt (see the Makefile).
    install_requires=['setuptools'],
    zip_safe=True,
    maintainer='ros2_cbpnet developers',
    maintainer_email='dev@ros2-cbpnet.invalid',
    description='On-robot continual learning of new image classes (CBPNet).',
    license='Apache-2.0',
    entry_points={
        'console_scripts': [
            'cbpnet_node = ros2_cbpnet.ros.node:main',
            'cbpnet_lifecycle_node = ros2_cbpnet.ros.lifecycle_node:main',
            'cbpnet-eval = ros2_cbpnet.tools.evaluate:main',
            'cbpnet-bench = ros2_cbpnet.tools.bench:main',
            'cbpnet-demo = ros2_cbpnet.tools.demo:main',
        ],
    },
)
