"""CBPNet model: frozen backbones, DualPrompt prompts, the Efficient CBP Block. No ROS here."""
from .backbones import (EMBEDDED_BACKBONE, RANDOM_WEIGHTS, Backbone, BackboneLoadError,
                        CNNBackbone, ViTBackbone, backbone_parameter_count, load_backbone,
                        parameter_count)
from .cbp import CBPBlock
from .cbpnet import PREDICTION_MODES, SELECTION_MODES, CBPNet

__all__ = [
    'Backbone', 'BackboneLoadError', 'CBPBlock', 'CBPNet', 'CNNBackbone', 'EMBEDDED_BACKBONE',
    'PREDICTION_MODES', 'RANDOM_WEIGHTS', 'SELECTION_MODES', 'ViTBackbone',
    'backbone_parameter_count', 'load_backbone', 'parameter_count',
]
