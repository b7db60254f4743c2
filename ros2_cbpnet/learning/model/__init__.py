"""CBPNet model: frozen backbones, DualPrompt prompts, the Efficient CBP Block. No ROS here."""
from .backbones import (EMBEDDED_BACKBONE, RANDOM_WEIGHTS, Backbone, BackboneLoadError,
                        CNNBackbone, ViTBackbone, backbone_parameter_count, load_backbone,
                        parameter_count)
from .cbp import CBPBlock
from .learned_state import PREDICTION_MODES, SELECTION_MODES, LearnedState

__all__ = [
    'Backbone', 'BackboneLoadError', 'CBPBlock', 'CNNBackbone', 'EMBEDDED_BACKBONE',
    'LearnedState', 'PREDICTION_MODES', 'RANDOM_WEIGHTS', 'SELECTION_MODES', 'ViTBackbone',
    'backbone_parameter_count', 'load_backbone', 'parameter_count',
]
