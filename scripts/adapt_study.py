#!/usr/bin/env python3
r"""Can CBPNet's trained parts add accuracy on top of the class statistics? A bounded study.

The field's recipe for frozen models is "adapt, then accumulate" (RanPAC's phase 1, APER):
train a small module, then classify the *adapted* feature with the closed-form head. An
earlier study here (README, "Learning quality") tried per-channel scale-and-shift on stages
5-7 trained with cross-entropy through a linear head on Fashion-MNIST 200 per class: within
noise. This script tries what that did not, on VALIDATION splits only (the test images are
never loaded), 5 tasks of 2 classes, LDA on the multi-layer query as the classifier of every
variant (``average accuracy`` as cbpnet-eval defines it):

- ``frozen``: no adaptation (the node's default);
- ``prompts-ce-aug``: scale-and-shift on stages 5-7 (the CNN prompts' form), trained on the
  first task with cross-entropy through a linear head, with augmentation (random shifts of up
  to 4 px and horizontal flips), then frozen;
- ``prompts-lda-aug``: the same module trained with an objective aligned with the
  closed-form head: cross-entropy of the LDA posterior (class means of the adapted features,
  recomputed every epoch; the frozen feature's shrunk within-class covariance);
- ``block-lda-cbp`` / ``block-lda-nocbp``: the CBP block as a residual adapter on the query
  itself, trained on *every* task with the LDA-aligned objective over the new classes and a
  bounded exemplar memory of earlier ones (``--memory`` images per class); earlier classes'
  means follow the adapter by the drift of their exemplars (semantic drift compensation);
  continual backpropagation on / off keeps the block trainable.

Data: Fashion-MNIST at ``--train-per-class`` (1,000 and the full 6,000 per class), 20 % of
each class's training images held out as the validation set. Adopt a variant only if it gains
>= 1 point over ``frozen`` on every seed.

Example::

    python scripts/adapt_study.py --train-per-class 1000 --seeds 0,1 --out results/adapt_1000.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ros2_cbpnet.learning.datasets import load_dataset, split_tasks
from ros2_cbpnet.learning.image_resize import resize_batch
from ros2_cbpnet.learning.model.backbones import load_backbone
from ros2_cbpnet.learning.model.cbp import CBPBlock
from ros2_cbpnet.learning.model.statistics import ClassStatistics
from ros2_cbpnet.tools.eval_protocols import validation_split

VARIANTS = ('frozen', 'prompts-ce-aug', 'prompts-lda-aug', 'block-lda-cbp', 'block-lda-nocbp')
FIRST = 5           # first adapted stage (the CNN family's G-prompt stage)
SIZE = 64
SHRINKAGE = 0.1


class Features:
    """Frozen trunk outputs at stage ``FIRST`` and the multi-layer query taps below it."""

    def __init__(self, backbone, images: np.ndarray, batch: int = 256) -> None:
        self.backbone, self.layers = backbone, backbone.default_query_layers()
        self.mean = torch.tensor(backbone.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(backbone.std).view(1, 3, 1, 1)
        self.images = images
        trunks, taps = [], []
        with torch.no_grad():
            for s in range(0, len(images), batch):
                h, t = backbone.tapped_trunk(self.normalise(images[s:s + batch]), FIRST,
                                             self.layers)
                trunks.append(h)
                taps.append(torch.cat(t, 1))
        self.trunk, self.taps = torch.cat(trunks), torch.cat(taps)

    def normalise(self, images: np.ndarray, augment: torch.Generator = None) -> torch.Tensor:
        """uint8 images -> normalised model input, optionally shifted and flipped."""
        x = torch.from_numpy(resize_batch(list(images), SIZE)).permute(0, 3, 1, 2).float()
        if augment is not None:
            pad = F.pad(x, (4, 4, 4, 4), mode='replicate')
            dx, dy = torch.randint(0, 9, (2,), generator=augment).tolist()
            x = pad[:, :, dy:dy + SIZE, dx:dx + SIZE]
            flip = torch.rand(x.shape[0], generator=augment) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return (x / 255.0 - self.mean) / self.std

    def query(self, idx: torch.Tensor, prompts=None, augment: torch.Generator = None
              ) -> torch.Tensor:
        """Multi-layer query of samples ``idx``: stages >= FIRST with scale-and-shift
        ``prompts`` ({stage: (2, C)}), from the cache unless augmented."""
        if augment is not None:
            h, t = self.backbone.tapped_trunk(
                self.normalise(self.images[idx.numpy()], augment), FIRST, self.layers)
            t = torch.cat(t, 1)
        else:
            h, t = self.trunk[idx], self.taps[idx]
        out = [t]
        for i in range(FIRST, self.backbone.num_layers):
            h = self.backbone.stages[i](h)
            if prompts is not None and i in prompts:
                p = prompts[i]
                h = h * (1.0 + p[0])[None, :, None, None] + p[1][None, :, None, None]
            if i in self.layers:
                out.append(self.backbone.pool_tap(h, i))
        return torch.cat(out, 1)

    def all_queries(self, prompts=None, batch: int = 512) -> torch.Tensor:
        """Queries of every sample (no gradient)."""
        with torch.no_grad():
            return torch.cat([self.query(torch.arange(s, min(s + batch, len(self.trunk))),
                                         prompts) for s in range(0, len(self.trunk), batch)])


def lda_logits(f: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """-1/2 squared Mahalanobis distance to each class mean (the LDA's log-posterior up to a
    constant per sample); trained with a calibrated temperature (:func:`temperature_for`)."""
    d = f[:, None, :] - means[None]
    return -0.5 * torch.einsum('bcd,de,bce->bc', d, precision, d)


def temperature_for(logits: torch.Tensor, target: torch.Tensor, goal: float = 0.5) -> float:
    """The factor that brings the cross-entropy of ``logits`` to ``goal`` (bisection in log
    space). In-sample LDA posteriors of a small task are nearly certain (fewer samples than
    dimensions), so unscaled the aligned loss starts at ~0 and trains nothing."""
    lo, hi = -12.0, 6.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if float(F.cross_entropy(logits * 10 ** mid, target)) > goal:
            lo = mid
        else:
            hi = mid
    return 10 ** ((lo + hi) / 2)


def precision_of(q: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Precision matrix of the shrunk within-class covariance of ``q``."""
    stats = ClassStatistics(q.shape[1], 1, SHRINKAGE)
    classes = torch.unique(y)
    stats.grow(int(classes.max()) + 1)
    stats.add(y, q)
    chol = stats.lda(torch.ones(stats.num_classes, dtype=torch.bool))['chol']
    return torch.cholesky_inverse(chol.double()).float()


def train_prompts(feats: Features, idx: torch.Tensor, y: torch.Tensor, loss_kind: str,
                  epochs: int, lr: float, seed: int) -> Dict[int, torch.Tensor]:
    """Scale-and-shift prompts on stages FIRST.. trained on samples ``idx`` (labels ``y``)."""
    bb = feats.backbone
    torch.manual_seed(seed)
    prompts = {i: torch.zeros(2, bb.channels[i], requires_grad=True)
               for i in range(FIRST, bb.num_layers)}
    classes = torch.unique(y)
    target = torch.searchsorted(classes, y)
    head = torch.nn.Linear(bb.query_dim(feats.layers), len(classes))
    params = list(prompts.values()) + (list(head.parameters()) if loss_kind == 'ce' else [])
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        frozen_q = torch.cat([feats.query(idx[s:s + 512]) for s in range(0, len(idx), 512)])
    precision = precision_of(frozen_q, target)
    means0 = torch.stack([frozen_q[target == k].mean(0) for k in range(len(classes))])
    scale = temperature_for(lda_logits(frozen_q, means0, precision), target)
    for _ in range(epochs):
        if loss_kind == 'lda':
            with torch.no_grad():
                q = torch.cat([feats.query(idx[s:s + 512], prompts)
                               for s in range(0, len(idx), 512)])
                means = torch.stack([q[target == k].mean(0) for k in range(len(classes))])
        order = torch.randperm(len(idx), generator=gen)
        for s in range(0, len(idx), 32):
            b = order[s:s + 32]
            f = feats.query(idx[b], prompts, augment=gen)
            logits = head(f) if loss_kind == 'ce' else scale * lda_logits(f, means, precision)
            loss = F.cross_entropy(logits, target[b])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
    return {i: p.detach() for i, p in prompts.items()}


def incremental_lda(q_train: torch.Tensor, y_train: torch.Tensor, q_val: torch.Tensor,
                    y_val: torch.Tensor, tasks: Sequence[Sequence[int]]) -> List[List[float]]:
    """acc[i][j] of the LDA over classes taught so far, features fixed."""
    stats = ClassStatistics(q_train.shape[1], 1, SHRINKAGE)
    stats.grow(sum(len(t) for t in tasks))
    acc = []
    for i, task in enumerate(tasks):
        pick = torch.isin(y_train, torch.tensor(task))
        stats.add(y_train[pick], q_train[pick])
        acc.append(_row(stats, q_val, y_val, tasks[:i + 1]))
    return acc


def _row(stats: ClassStatistics, q_val, y_val, tasks) -> List[float]:
    active = torch.zeros(stats.num_classes, dtype=torch.bool)
    seen = [c for t in tasks for c in t]
    active[seen] = True
    pred = stats.log_posterior(q_val, active).argmax(1)
    return [float((pred[torch.isin(y_val, torch.tensor(t))] == y_val[
        torch.isin(y_val, torch.tensor(t))]).float().mean()) for t in tasks]


def continual_block(q_train, y_train, q_val, y_val, tasks, *, cbp: bool, memory: int,
                    epochs: int, lr: float, seed: int) -> Tuple[List[List[float]], int]:
    """The CBP block as a residual adapter on the query, trained on every task (LDA-aligned
    loss over new classes and exemplars of old ones); old means drift-compensated."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    dim = q_train.shape[1]
    # Rate and maturity as the learner's defaults; a rate that acts within the short stream.
    block = CBPBlock(dim, 64, replacement_rate=1e-3, maturity_threshold=20, enabled=cbp)
    stats = ClassStatistics(dim, 1, SHRINKAGE)
    stats.grow(sum(len(t) for t in tasks))
    exemplars: Dict[int, torch.Tensor] = {}
    acc, replaced = [], 0
    for i, task in enumerate(tasks):
        new = torch.nonzero(torch.isin(y_train, torch.tensor(task))).flatten()
        old_ids = torch.cat(list(exemplars.values())) if exemplars else new[:0]
        idx = torch.cat([new, old_ids])
        classes = sorted({int(c) for c in y_train[idx]})
        target = torch.tensor([classes.index(int(c)) for c in y_train[idx]])
        block.eval()
        with torch.no_grad():
            before = {c: block(q_train[e]) for c, e in exemplars.items()}
            f0 = block(q_train[idx])
            precision = precision_of(f0, target)
            means0 = torch.stack([f0[target == k].mean(0) for k in range(len(classes))])
            scale = temperature_for(lda_logits(f0, means0, precision), target)
        opt = torch.optim.Adam(block.parameters(), lr=lr)
        for _ in range(epochs):
            block.eval()
            with torch.no_grad():
                f_all = block(q_train[idx])
                means = torch.stack([f_all[target == k].mean(0) for k in range(len(classes))])
            block.train()
            order = torch.randperm(len(idx), generator=gen)
            for s in range(0, len(idx), 32):
                b = order[s:s + 32]
                loss = F.cross_entropy(
                    scale * lda_logits(block(q_train[idx[b]]), means, precision), target[b])
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(list(block.parameters()), 1.0)
                opt.step()
                block.update_utility()
                replaced += block.replace_units(opt)
        block.eval()
        with torch.no_grad():
            for c, e in exemplars.items():  # semantic drift compensation of old means
                stats.query_mean[c] += (block(q_train[e]) - before[c]).mean(0).to(
                    stats.query_mean.dtype)
            stats.add(y_train[new], block(q_train[new]))
            rng = np.random.default_rng([seed, i])
            for c in task:
                pool = torch.nonzero(y_train == c).flatten().numpy()
                exemplars[c] = torch.from_numpy(rng.choice(pool, min(memory, len(pool)),
                                                           replace=False))
            acc.append(_row(stats, block(q_val), y_val, tasks[:i + 1]))
    return acc, replaced


def run(args: argparse.Namespace, seed: int, backbone) -> Dict[str, Dict[str, float]]:
    data = validation_split(load_dataset('fashion-mnist', seed=seed,
                                         train_per_class=args.train_per_class), 0.2, seed)
    tasks = split_tasks(data.num_classes, 5)
    started = time.time()
    train, val = Features(backbone, data.train_images), Features(backbone, data.test_images)
    y_train = torch.from_numpy(data.train_labels)
    y_val = torch.from_numpy(data.test_labels)
    q_train, q_val = train.all_queries(), val.all_queries()
    print(f'seed {seed}: {len(y_train)} train / {len(y_val)} validation images, frozen pass '
          f'{time.time() - started:.0f} s', flush=True)
    out: Dict[str, Dict[str, float]] = {}
    for variant in args.variants.split(','):
        t0 = time.time()
        replaced = 0
        if variant == 'frozen':
            acc = incremental_lda(q_train, y_train, q_val, y_val, tasks)
        elif variant.startswith('prompts'):
            first = torch.nonzero(torch.isin(y_train, torch.tensor(tasks[0]))).flatten()
            prompts = train_prompts(train, first, y_train[first],
                                    'ce' if '-ce' in variant else 'lda', args.epochs, args.lr,
                                    seed)
            acc = incremental_lda(train.all_queries(prompts), y_train,
                                  val.all_queries(prompts), y_val, tasks)
        else:
            acc, replaced = continual_block(q_train, y_train, q_val, y_val, tasks,
                                            cbp=variant.endswith('-cbp'), memory=args.memory,
                                            epochs=args.epochs, lr=args.block_lr, seed=seed)
        avg = float(np.mean(acc[-1]))  # A_T as cbpnet-eval reports it
        out[variant] = {'average_accuracy': avg, 'acc_matrix': acc, 'replaced_units': replaced,
                        'seconds': round(time.time() - t0, 1)}
        print(f'  {variant}: average accuracy {100 * avg:.2f} % ({time.time() - t0:.0f} s, '
              f'{replaced} replacements)', flush=True)
    return out


def main(argv: Sequence[str] = None) -> int:
    """Run the study; prints a table and writes ``--out``."""
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--train-per-class', type=int, default=1000)
    p.add_argument('--seeds', default='0,1')
    p.add_argument('--variants', default=','.join(VARIANTS))
    p.add_argument('--epochs', type=int, default=5)
    p.add_argument('--lr', type=float, default=0.01, help='prompt learning rate')
    p.add_argument('--block-lr', type=float, default=0.01, help='CBP block learning rate')
    p.add_argument('--memory', type=int, default=20, help='exemplars per earlier class')
    p.add_argument('--out', default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    backbone = load_backbone('tf_efficientnet_lite0', '', image_size=SIZE).eval()
    seeds = [int(s) for s in args.seeds.split(',')]
    results = {seed: run(args, seed, backbone) for seed in seeds}
    print(f'\nFashion-MNIST {args.train_per_class}/class, validation split, 5 tasks x 2; '
          'average accuracy % per seed, and the gain over frozen:\n')
    print('| variant | ' + ' | '.join(f'seed {s}' for s in seeds) + ' | mean | gain |')
    print('|---|' + '---|' * (len(seeds) + 2))
    base = np.mean([results[s]['frozen']['average_accuracy'] for s in seeds])
    for variant in args.variants.split(','):
        vals = [100 * results[s][variant]['average_accuracy'] for s in seeds]
        print(f'| {variant} | ' + ' | '.join(f'{v:.2f}' for v in vals)
              + f' | {np.mean(vals):.2f} | {np.mean(vals) - 100 * base:+.2f} |')
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, 'w', encoding='utf-8') as fh:
            json.dump({'options': vars(args), 'split': 'validation',
                       'results': {str(k): v for k, v in results.items()}}, fh, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
