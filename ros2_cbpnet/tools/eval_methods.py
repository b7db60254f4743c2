"""The methods ``cbpnet-eval`` compares, and how each one is configured (no ROS).

Learner methods (:class:`~ros2_cbpnet.learning.learner.ContinualLearner`, all on the same frozen
backbone, seeds and splits):

- ``cbpnet``: the learner with its defaults (:class:`~ros2_cbpnet.learning.learner.LearnerConfig`);
- ``cbpnet-nocbp``: the same with ``cbp_enabled=False`` (block kept, never re-initialised);
- ``cbpnet-paper``: the published CBPNet, ``recipe='paper'`` (DualPrompt prompts with
  key-query selection, the CBP block, one softmax head over all classes, the G-prompt trained
  on every task, no replay, nothing of the class statistics in the prediction);
- ``dualprompt``: the same recipe with CBP off (``cbp_enabled=False``): the paper's own
  DualPrompt baseline, in the same pipeline;
- ``joint``: the ``cbpnet`` configuration trained on all classes seen so far at once, after
  every task (not continual: the upper bound of the same architecture).

Baselines on frozen features (:mod:`ros2_cbpnet.learning.baselines`): ``lda``, ``ranpac``, ``ncm``,
``linear``. By default they use the backbone's pre-logits feature; ``--baseline-query
multilayer`` gives them CBPNet's multi-layer query instead.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Dict, Optional, Union

import torch

from ..learning.baselines import BASELINES, FrozenFeatureBaseline
from ..learning.learner import ContinualLearner, LearnerConfig
from ..learning.config import RECIPES
from ..learning.model.backbones import Backbone

__all__ = ['BASELINE_METHODS', 'LEARNER_METHODS', 'METHODS', 'METHOD_RECIPES', 'Model',
           'learner_config', 'make_model']

LEARNER_METHODS = ('cbpnet', 'cbpnet-nocbp', 'cbpnet-paper', 'dualprompt', 'joint')
BASELINE_METHODS = ('lda', 'ranpac', 'ncm', 'linear')
METHODS = LEARNER_METHODS + BASELINE_METHODS

#: LearnerConfig fields each learner method sets before the command line's options.
METHOD_RECIPES: Dict[str, Dict[str, Any]] = {
    'cbpnet': {}, 'joint': {},
    'cbpnet-nocbp': {'cbp_enabled': False},
    'cbpnet-paper': {'recipe': 'paper', 'cbp_enabled': True},
    'dualprompt': {'recipe': 'paper', 'cbp_enabled': False},
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
    'unknown_threshold': 'unknown_threshold', 'key_steps': 'key_steps',
    'pull_constraint_coeff': 'pull_constraint_coeff', 'lda_spread': 'lda_spread',
}


def learner_config(args: argparse.Namespace, method: str, seed: int,
                   image_size: int) -> LearnerConfig:
    """The :class:`LearnerConfig` of one run: defaults, the method's recipe, then every
    option given on the command line (explicit options win over the method's settings).

    Raises:
        ValueError: an option sets a field that the method's recipe fixes (``cbpnet-paper``
            and ``dualprompt`` fix those of ``RECIPES['paper']`` and CBP on/off).
    """
    changes: Dict[str, Any] = dict(METHOD_RECIPES.get(method, {}))
    fixed = dict(RECIPES[changes.get('recipe', 'custom')])
    if method in ('cbpnet-nocbp', 'cbpnet-paper', 'dualprompt'):
        fixed['cbp_enabled'] = changes['cbp_enabled']
    for dest, name in _OVERRIDES.items():
        value = getattr(args, dest, None)
        if value is not None:
            changes[name] = value
    if getattr(args, 'g_prompt_training', None) is not None:
        changes['g_prompt_first_task_only'] = args.g_prompt_training == 'first-task'
    if getattr(args, 'train_cbp_block', None) is not None:
        changes['train_cbp_block'] = args.train_cbp_block
    if getattr(args, 'cbp', None) is not None:
        changes['cbp_enabled'] = args.cbp
    clash = sorted(k for k, v in fixed.items() if k in changes and changes[k] != v)
    if clash:
        raise ValueError(f'{method} fixes {", ".join(f"{k}={fixed[k]}" for k in clash)}; '
                         'drop the option or use --method cbpnet')
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
