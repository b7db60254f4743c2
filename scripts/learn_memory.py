#!/usr/bin/env python3
"""Peak resident memory of learning a full sample buffer, as a robot would hit it.

Fills a buffer like the node's (``max_buffer_samples`` images, stored at the network input
size, uint8) and learns it as one task, then reports the process's peak resident memory
(VmHWM) before and during ``learn_task`` and the difference. Run once per setting in a fresh
process, so earlier peaks do not hide later ones::

    python scripts/learn_memory.py --image-size 128                      # node default
    python scripts/learn_memory.py --image-size 224                      # a ViT's input size
    python scripts/learn_memory.py --image-size 128 --prediction task    # learned recipe

Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from ros2_cbpnet.learning.learner import ContinualLearner, LearnerConfig


def _status(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes."""
    with open('/proc/self/status', encoding='ascii') as fh:
        for line in fh:
            if line.startswith(field + ':'):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> None:
    with open('/proc/self/clear_refs', 'w', encoding='ascii') as fh:
        fh.write('5')  # reset VmHWM to the current RSS


def main() -> int:
    """Measure and print the figures."""
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--image-size', type=int, default=128)
    p.add_argument('--samples', type=int, default=5000, help="the node's max_buffer_samples")
    p.add_argument('--classes', type=int, default=10)
    p.add_argument('--prediction', default='stats')
    p.add_argument('--backbone', default='tf_efficientnet_lite0')
    p.add_argument('--backbone-checkpoint', default='')
    p.add_argument('--threads', type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    config = LearnerConfig(backbone=args.backbone, backbone_checkpoint=args.backbone_checkpoint,
                           image_size=args.image_size, prediction=args.prediction,
                           device='cpu', epochs=1, min_steps=0)
    learner = ContinualLearner(config)
    rng = np.random.default_rng(0)
    s = args.image_size
    # The node's buffer keeps samples at the network input size.
    buffer = [rng.integers(0, 256, (s, s, 3), dtype=np.uint8) for _ in range(args.samples)]
    labels = [f'class{i % args.classes}' for i in range(args.samples)]
    _reset_peak()
    before = _status('VmRSS')
    started = time.monotonic()
    learner.learn_task(buffer, labels)
    seconds = time.monotonic() - started
    peak = _status('VmHWM')
    print(json.dumps({
        'backbone': args.backbone, 'image_size': s, 'samples': args.samples,
        'prediction': args.prediction, 'buffer_mb': round(sum(b.nbytes for b in buffer) / 2**20),
        'rss_before_learning_mb': round(before / 2**20),
        'peak_rss_during_learning_mb': round(peak / 2**20),
        'learning_adds_mb': round((peak - before) / 2**20), 'learn_task_s': round(seconds, 1),
    }))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
