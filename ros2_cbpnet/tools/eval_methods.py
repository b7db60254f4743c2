"""The methods ``cbpnet-eval`` compares, and how each one is configured (no ROS).

Learner methods (:class:`~ros2_cbpnet.learner.ContinualLearner`, all on the same frozen
backbone, seeds and splits):

- ``cbpnet``: the learner with its defaults (:class:`~ros2_cbpnet.learner.LearnerConfig`);
- ``cbpnet-nocbp``: the same with ``cbp_enabled=False`` (block kept, never re-initialised);
- ``dualprompt``: the published DualPrompt recipe (Wang et al., ECCV 2022) in this code base:
  key-query prompt selection on the pre-logits query, one softmax head over all classes, the
  G-prompt trained on every task, no CBP block, no feature replay, no statistics;
- ``joint``: the ``cbpnet`` configuration trained on all classes seen so far at once, after
  every task (not continual: the upper bound of the same architecture).

Baselines on frozen features (:mod:`ros2_cbpnet.baselines`): ``lda``, ``ranpac``, ``ncm``,
``linear``. By default they use the backbone's pre-logits feature; ``--baseline-query
multilayer`` gives them CBPNet's multi-layer query instead.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Dict, Optional, Union

import torch

from ..baselines import BASELINES, FrozenFeatureBaseline
from ..learner import ContinualLearner, LearnerConfig
from ..model.backbones import Backbone

__all__ = ['BASELINE_METHODS', 'LEARNER_METHODS', 'METHODS', 'Model', 'PUBLISHED_DUALPROMPT',
           'learner_config', 'make_model']

LEARNER_METHODS = ('cbpnet', 'cbpnet-nocbp', 'dualprompt', 'joint')
BASELINE_METHODS = ('lda', 'ranpac', 'ncm', 'linear')
METHODS = LEARNER_METHODS + BASELINE_METHODS

#: LearnerConfig fields of the published DualPrompt recipe (``query_layers=[-1]``: the
#: pre-logits feature, whatever the backbone).
PUBLISHED_DUALPROMPT: Dict[str, Any] = {
    'prompt_selection': 'key', 'prediction': 'all', 'feature_replay_coeff': 0.0,
    'g_prompt_first_task_only': False, 'train_cbp_block': False, 'cbp_enabled': False,
    'min_steps': 0, 'query_layers': [-1],
}

Model = Union[ContinualLearner, FrozenFeatureBaseline]

#: argparse destination -> LearnerConfig field, for options that override a field when given.
_OVERRIDES = {
    'prompt_selection': 'prompt_selection', 'prediction': 'prediction',
    'head_weight': 'head_weight', 'feature_replay_coeff': 'feature_replay_coeff',
    'query_layers': 'query_layers', 'g_prompt_layers': 'g_prompt_layers',
    'e_prompt_layers': 'e_prompt_layers', 'lda_shrinkage': 'lda_shrinkage',
    'min_steps': 'min_steps', 'cbp_hidden_units': 'cbp_hidden_units',
    'cbp_replacement_rate': 'cbp_replacement_rate',
    'cbp_maturity_threshold': 'cbp_maturity_threshold', 'cbp_decay_rate': 'cbp_decay_rate',
    'epochs': 'epochs', 'batch_size': 'batch_size', 'lr': 'learning_rate',
    'unknown_threshold': 'unknown_threshold',
}


def learner_config(args: argparse.Namespace, method: str, seed: int,
                   image_size: int) -> LearnerConfig:
    """The :class:`LearnerConfig` of one run: defaults, the method's recipe, then every
    option given on the command line (explicit options win over the recipe)."""
    changes: Dict[str, Any] = {}
    if method == 'cbpnet-nocbp':
        changes['cbp_enabled'] = False
    elif method == 'dualprompt':
        changes.update(PUBLISHED_DUALPROMPT)
    for dest, name in _OVERRIDES.items():
        value = getattr(args, dest, None)
        if value is not None:
            changes[name] = value
    if getattr(args, 'g_prompt_training', None) is not None:
        changes['g_prompt_first_task_only'] = args.g_prompt_training == 'first-task'
    if getattr(args, 'train_cbp_block', None) is not None:
        changes['train_cbp_block'] = args.train_cbp_block
    if getattr(args, 'cbp', None) is not None and method != 'cbpnet-nocbp':
        changes['cbp_enabled'] = args.cbp
    if changes.get('e_prompt_layers') == [-1]:
        raise ValueError('--e-prompt-layers cannot be none: every task has an E-prompt')
    changes.update(backbone=args.backbone, backbone_checkpoint=args.backbone_checkpoint,
                   device=args.device, image_size=image_size, seed=seed)
    return LearnerConfig().replace(**changes)


def make_model(method: str, config: LearnerConfig, backbone: Backbone, *,
               args: Optional[argparse.Namespace] = None) -> Model:
    """A fresh learner or baseline for ``method`` on the shared ``backbone``.

    Baselines take image size, device, seed and the optimiser settings from ``config``, and
    their own settings (``--baseline-query``, ``--ncm-metric``, ``--ranpac-dim``,
    ``--ranpac-ridge``, ``--lda-shrinkage``) from ``args``.
    """
    # The learner draws its initial CBP block from the global RNG; seed it so runs repeat
    # and the learner methods of one seed start from the same block.
    torch.manual_seed(config.seed)
    if method in LEARNER_METHODS:
        return ContinualLearner(config, backbone)
    if method not in BASELINES:
        raise ValueError(f'unknown method {method!r}')
    multilayer = getattr(args, 'baseline_query', 'prelogits') == 'multilayer'
    common: Dict[str, Any] = dict(
        image_size=config.image_size, device=config.device, seed=config.seed,
        query_layers=backbone.default_query_layers() if multilayer else None)
    if method == 'ncm':
        return BASELINES['ncm'](backbone, metric=getattr(args, 'ncm_metric', 'cosine'), **common)
    if method == 'lda':
        return BASELINES['lda'](backbone, shrinkage=config.lda_shrinkage, **common)
    if method == 'ranpac':
        return BASELINES['ranpac'](backbone, projection_dim=getattr(args, 'ranpac_dim', 5000),
                                   ridge=getattr(args, 'ranpac_ridge', 0.1), **common)
    return BASELINES['linear'](backbone, epochs=config.epochs, batch_size=config.batch_size,
                               learning_rate=config.learning_rate,
                               grad_clip_norm=config.grad_clip_norm, **common)


def model_config(model: Model) -> Dict[str, Any]:
    """The settings of a model, for result files."""
    if isinstance(model, ContinualLearner):
        return dataclasses.asdict(model.config)
    return model.config_dict()
