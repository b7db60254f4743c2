"""The frozen pass in ONNX Runtime: the same numbers as torch, the same predictions, a cache
that is never trusted blindly, a fallback to torch that says why, and progress and cancel of
the frozen pass of ``learn_task``."""
import json
import os
import sys
import threading

import numpy as np
import pytest
import torch

from ros2_cbpnet.learning import frozen_runtime
from ros2_cbpnet.learning.datasets import split_tasks, task_subset
from ros2_cbpnet.learning.frozen_runtime import (PARITY_RTOL, load_onnx_query, query_fingerprint,
                                                 resolve_providers)
from ros2_cbpnet.learning.learner import ContinualLearner, LearnerConfig, LearningCancelled
from ros2_cbpnet.learning.model import load_backbone

pytest.importorskip('onnxruntime')
LAYERS = [3, 4, 5, 6, 7]


@pytest.fixture(scope='module')
def backbone():
    return load_backbone('tf_efficientnet_lite0', image_size=128)


def _photos():
    """Real photographs (scikit-image's samples) at the node's input size."""
    from skimage import data as samples
    images = [samples.astronaut(), samples.coffee(), samples.chelsea(), samples.rocket()]
    return [np.ascontiguousarray(img[..., :3]) for img in images]


def _learner(backbone, runtime, **kw):
    return ContinualLearner(LearnerConfig(image_size=kw.pop('image_size', 128), device='cpu',
                                          runtime=runtime, **kw), backbone=backbone)


def test_exported_queries_equal_torch_on_real_photos(backbone):
    learner = _learner(backbone, 'onnxruntime')
    assert learner.runtime == ('onnxruntime', 'CPUExecutionProvider')
    x = learner.preprocess(_photos())
    with torch.inference_mode():
        ref = backbone.query(x, LAYERS)
    out = learner._onnx(x)
    assert out.shape == ref.shape == (4, backbone.query_dim(LAYERS))
    assert float((out - ref).abs().max() / ref.abs().max()) <= PARITY_RTOL
    # Each photo's own query, not a batch-level mix (batch axis is dynamic).
    single = learner._onnx(x[2:3])
    assert torch.allclose(single[0], out[2], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_onnx_and_torch_learn_and_predict_the_same(backbone, digits):
    """The demo's job on both runtimes: identical top-1 on every test image of digits."""
    tasks = split_tasks(10, 5)
    learners = {r: _learner(backbone, r, image_size=64) for r in ('torch', 'onnxruntime')}
    calls = []
    real_call = frozen_runtime.OnnxQuery.__call__

    def counting(self, x):
        calls.append(x.shape[0])
        return real_call(self, x)
    for t in tasks:
        x, y = task_subset(digits.train_images, digits.train_labels, t)
        for runtime, learner in learners.items():
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(frozen_runtime.OnnxQuery, '__call__', counting)
                learner.learn_task(list(x), [digits.classes[i] for i in y])
    # The statistics of the ONNX learner came from ONNX Runtime, every image once.
    assert sum(calls) == len(digits.train_images)
    torch_stats = learners['torch'].state.stats
    onnx_stats = learners['onnxruntime'].state.stats
    assert torch.allclose(torch_stats.query_mean, onnx_stats.query_mean, rtol=1e-4, atol=1e-5)
    images = list(digits.test_images)
    a = learners['torch'].predict(images, top_k=1)
    b = learners['onnxruntime'].predict(images, top_k=1)
    assert [p.topk[0][0] for p in a] == [p.topk[0][0] for p in b]
    assert {(p.runtime, p.provider) for p in b} == {('onnxruntime', 'CPUExecutionProvider')}
    assert {p.runtime for p in a} == {'torch'}
    assert np.allclose([p.novelty for p in a], [p.novelty for p in b], atol=1e-3)


def test_prompted_prediction_stays_in_torch(backbone):
    learner = _learner(backbone, 'auto', prediction='task', image_size=64, min_steps=0,
                       epochs=1)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(8)]
    learner.learn_task(frames, ['a'] * 4 + ['b'] * 4)
    assert learner.runtime[0] == 'torch'
    assert learner.predict(frames[:1])[0].runtime == 'torch'
    learner.reconfigure(prediction='stats')
    assert learner.predict(frames[:1])[0].runtime == 'onnxruntime'


def test_fallback_to_torch_when_onnxruntime_is_missing(backbone, monkeypatch):
    monkeypatch.setitem(sys.modules, 'onnxruntime', None)  # import fails
    learner = _learner(backbone, 'auto')
    assert learner.runtime == ('torch', 'cpu')
    assert 'onnxruntime is not installed' in learner.runtime_note
    with pytest.raises(ValueError, match='runtime onnxruntime cannot be used: onnxruntime is '
                                         'not installed'):
        _learner(backbone, 'onnxruntime')


def test_fallback_to_torch_when_the_export_fails(backbone, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError('unsupported operator')
    monkeypatch.setattr(frozen_runtime, '_export', broken)
    monkeypatch.setattr(frozen_runtime, '_EXPORTS', frozen_runtime.OrderedDict())
    learner = _learner(backbone, 'auto', image_size=96)
    assert learner.runtime[0] == 'torch'
    assert 'the ONNX export failed: RuntimeError: unsupported operator' in learner.runtime_note
    frame = np.full((96, 96, 3), 120, np.uint8)
    learner.learn_task([frame, frame + 5, frame - 5, frame + 9], ['a', 'a', 'b', 'b'])
    assert learner.predict([frame])[0].runtime == 'torch'


def _cached(directory):
    return sorted(n for n in os.listdir(directory) if n.startswith('frozen-query-'))


def test_cache_is_reused_invalidated_and_never_trusted(backbone, tmp_path, monkeypatch):
    monkeypatch.setattr(frozen_runtime, '_EXPORTS', frozen_runtime.OrderedDict())
    exports = []
    real_export = frozen_runtime._export

    def counting(*args):
        exports.append(args[2])
        return real_export(*args)
    monkeypatch.setattr(frozen_runtime, '_export', counting)
    cache = str(tmp_path)

    def load(size=128, layers=LAYERS):
        frozen_runtime._EXPORTS.clear()  # what a fresh process has
        runtime, why = load_onnx_query(backbone, layers, size, cache_dir=cache)
        assert why == 'ok'
        return runtime
    first = load()
    onnx_file = first.path
    assert exports == [128] and _cached(cache) == [os.path.basename(onnx_file),
                                                   os.path.basename(onnx_file) + '.json']
    assert os.path.basename(onnx_file).startswith('frozen-query-' + query_fingerprint(
        backbone, 128, LAYERS)[:16])
    load()
    assert exports == [128]  # reused
    # A truncated file: its hash no longer matches the record -> rebuilt.
    with open(onnx_file, 'r+b') as fh:
        fh.truncate(os.path.getsize(onnx_file) // 2)
    load()
    assert exports == [128, 128]
    # A file that loads but computes something else, with a record that matches it: the
    # parity probe refuses it.
    other = real_export(backbone, [7], 128)
    meta = json.loads(open(onnx_file + '.json').read())
    with open(onnx_file, 'wb') as fh:
        fh.write(other)
    meta['sha256'] = frozen_runtime.hashlib.sha256(other).hexdigest()
    with open(onnx_file + '.json', 'w') as fh:
        json.dump(meta, fh)
    runtime = load()
    assert exports == [128, 128, 128]
    assert runtime(torch.zeros(1, 3, 128, 128)).shape[1] == backbone.query_dim(LAYERS)
    # Another input size is another function: another file, and the old one goes.
    again = load(size=96)
    assert exports[-1] == 96 and _cached(cache) == sorted(
        [os.path.basename(again.path), os.path.basename(again.path) + '.json'])


def test_providers_are_resolved_and_checked():
    cpu, cuda = torch.device('cpu'), torch.device('cuda')
    have = ['CUDAExecutionProvider', 'CPUExecutionProvider']
    assert resolve_providers([], have, cpu) == ['CPUExecutionProvider']
    assert resolve_providers([], have, cuda) == have
    assert resolve_providers(['cuda', 'cpu'], have, cpu) == have
    with pytest.raises(ValueError, match="'tensorrt' is not available"):
        resolve_providers(['tensorrt'], have, cuda)


def test_frozen_pass_reports_progress_and_stops_when_cancelled(backbone, digits):
    learner = _learner(backbone, 'auto', image_size=64)
    x, y = task_subset(digits.train_images, digits.train_labels, [0, 1, 2, 3])
    cancel = threading.Event()
    seen = []

    def progress(p):
        seen.append(p)
        if p.stage == 'features' and p.done >= 64:
            cancel.set()
    with pytest.raises(LearningCancelled):
        learner.learn_task(list(x), [digits.classes[i] for i in y], progress=progress,
                           cancel=cancel)
    assert [p.stage for p in seen] == ['features'] * len(seen)
    assert seen[-1].done < len(x) == seen[-1].total  # stopped within the pass
    assert learner.num_tasks == 0 and learner.model_version == 0
