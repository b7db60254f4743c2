"""Class statistics (streaming LDA, novelty, leave-one-out calibration), effective rank, and
checkpoints written before the model was split into parts."""
import numpy as np
import pytest
import torch

from ros2_cbpnet.learning.learner import ContinualLearner, LearnerConfig
from ros2_cbpnet.learning.metrics import effective_rank
from ros2_cbpnet.learning.model import load_backbone
from ros2_cbpnet.learning.model.statistics import ClassStatistics

ALL = torch.ones(3, dtype=torch.bool)


def _gaussians(seed=0, d=6, n=(30, 20, 25), spread=4.0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(n), d, generator=g) * spread
    x = torch.cat([centres[c] + torch.randn(k, d, generator=g) for c, k in enumerate(n)])
    y = torch.cat([torch.full((k,), c) for c, k in enumerate(n)])
    return x.double(), y, centres.double()


def _stats(x, y, shrinkage=0.1, chunks=1):
    st = ClassStatistics(x.shape[1], 1, shrinkage).double()
    st.grow(int(y.max()) + 1)
    for part in torch.arange(len(y)).chunk(chunks):
        st.add(y[part], x[part])
    return st


def test_streaming_statistics_equal_the_batch_ones():
    x, y, _ = _gaussians()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
    once, streamed = _stats(x, y), _stats(x[order], y[order], chunks=7)
    assert torch.allclose(once.query_mean, streamed.query_mean)
    assert torch.allclose(once.query_scatter, streamed.query_scatter)
    assert once.class_count.tolist() == streamed.class_count.tolist() == [30, 20, 25]
    mu = torch.stack([x[y == c].mean(0) for c in range(3)])
    within = sum((x[y == c] - mu[c]).T @ (x[y == c] - mu[c]) for c in range(3))
    assert torch.allclose(once.query_scatter, within)


def test_lda_posterior_separates_gaussians_and_is_a_distribution():
    x, y, centres = _gaussians()
    st = _stats(x, y)
    log_post = st.log_posterior(centres + 0.1, ALL)
    assert log_post.argmax(1).tolist() == [0, 1, 2]
    assert torch.allclose(log_post.exp().sum(1), torch.ones(3, dtype=log_post.dtype))
    forgotten = torch.tensor([True, False, True])
    assert torch.isinf(st.log_posterior(centres, forgotten)[:, 1]).all()


def test_novelty_is_higher_far_from_every_class_and_standardised():
    x, y, centres = _gaussians()
    st = _stats(x, y)
    st.calibrate_novelty(st.leave_one_out_novelty(y, x, ALL))
    near = st.novelty(centres, ALL)
    far = st.novelty(centres.mean(0, keepdim=True) + 30.0, ALL)
    assert far.item() > near.max().item() + 3.0
    # Taught samples average near 0 with unit spread on the calibrated scale.
    taught = st.novelty(x, ALL)
    assert abs(taught.mean().item()) < 0.7 and 0.3 < taught.std().item() < 2.0


def test_leave_one_out_novelty_matches_refitting_without_the_sample():
    x, y, _ = _gaussians(n=(12, 10, 9))
    st = _stats(x, y, shrinkage=0.3)
    fast = st.leave_one_out_novelty(y, x, ALL)
    brute = []
    for i in range(len(y)):
        keep = torch.arange(len(y)) != i
        brute.append(_stats(x[keep], y[keep], shrinkage=0.3).raw_novelty(x[i:i + 1], ALL))
    brute = torch.cat(brute)
    # Sherman-Morrison leaves out the small change of the shrinkage's trace term only.
    assert torch.allclose(fast.double(), brute.double(), rtol=0.15, atol=0.05)
    in_sample = st.raw_novelty(x, ALL)
    assert (fast > in_sample).float().mean() > 0.9  # held out is farther than in sample


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_refining_one_class_does_not_pull_the_frames_of_the_others(seed):
    """With many more views of one class, plain LDA lets that class draw the others' frames
    (its mean is better estimated, so it looks closer); the predictive spread fixes it."""
    g = torch.Generator().manual_seed(seed)
    d = 100
    centres = torch.randn(3, d, generator=g).double() * 0.4
    n = (5, 5, 300)  # classes 0 and 1 seen 5 times, class 2 refined to 300 views
    x = torch.cat([centres[c] + torch.randn(k, d, generator=g).double() for c, k in enumerate(n)])
    y = torch.cat([torch.full((k,), c) for c, k in enumerate(n)])
    probe = torch.cat([centres[c] + torch.randn(300, d, generator=g).double() for c in (0, 1)])
    truth = torch.cat([torch.full((300,), c) for c in (0, 1)])
    st = _stats(x, y, shrinkage=0.2)
    ours = (st.log_posterior(probe, ALL).argmax(1) == truth).double().mean().item()
    lda = st.lda(ALL)
    plain = ((probe @ lda['w'].T + lda['b']).argmax(1) == truth).double().mean().item()
    assert plain < 0.75 and ours > 0.85 and ours > plain + 0.15, (plain, ours)


def test_effective_rank():
    assert effective_rank(np.eye(8)) == pytest.approx(8.0)
    assert effective_rank(np.outer(np.arange(1, 6), np.ones(4))) == pytest.approx(1.0)
    assert effective_rank(np.zeros((3, 3))) == 0.0
    rank = effective_rank(np.random.default_rng(0).normal(size=(200, 16)))
    assert 12.0 < rank < 16.0
    with pytest.raises(ValueError):
        effective_rank(np.zeros(3))


_OLD_NAMES = {'prompts.g_prompt.': 'g_prompt.', 'prompts.e_prompts.': 'e_prompts.',
              'prompts.prompt_keys.': 'prompt_keys.', 'head.weight': 'head_weight',
              'head.bias': 'head_bias', 'stats.class_count': 'class_count',
              'stats.query_mean': 'query_mean', 'stats.query_scatter': 'query_scatter',
              'stats.feature_mean': 'feature_mean', 'stats.feature_var': 'feature_var'}


def test_a_checkpoint_of_the_first_layout_still_loads():
    """Checkpoints written before the split (flat keys, pre-logits query, no class_active,
    no task_trained, no novelty calibration) load and predict as they did."""
    bb = load_backbone('tf_efficientnet_lite0', 'random', image_size=32)
    config = LearnerConfig(image_size=32, device='cpu', query_layers=[-1], prediction='task',
                           epochs=1, min_steps=0)
    learner = ContinualLearner(config, backbone=bb)
    rng = np.random.default_rng(0)
    images = list(rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8))
    learner.learn_task(images[:6], ['a'] * 3 + ['b'] * 3)
    learner.learn_task(images[6:], ['c'] * 3 + ['d'] * 3)
    payload = learner.checkpoint_payload()
    old = {}
    for key, value in payload['state_dict'].items():
        if key in ('class_active', 'task_trained') or key.startswith('stats.novelty'):
            continue
        for new, name in _OLD_NAMES.items():
            if key.startswith(new):
                key = name + key[len(new):]
                break
        old[key] = value
    arch = {k: v for k, v in payload['architecture'].items() if k != 'query_layers'}
    restored = ContinualLearner(config.replace(query_layers=[]), backbone=bb)
    restored.load_checkpoint_payload(dict(payload, state_dict=old, architecture=arch))
    assert restored.config.query_layers == [bb.num_layers - 1]
    assert restored.classes == ['a', 'b', 'c', 'd']
    a, b = learner.predict(images), restored.predict(images)
    assert [p.label for p in a] == [p.label for p in b]
    assert np.allclose([p.score for p in a], [p.score for p in b], atol=1e-5)


@pytest.fixture(scope='module')
def digits_queries():
    """Multi-layer queries of digits through the embedded backbone, on a validation split
    (every other class keeps a tenth of its training images) and its held-out images."""
    from ros2_cbpnet.learning.datasets import load_dataset
    from ros2_cbpnet.tools.eval_protocols import thin_classes, validation_split
    data = thin_classes(validation_split(load_dataset('digits', seed=0), 0.2, 0), 10, 0)
    learner = ContinualLearner(LearnerConfig(image_size=64, device='cpu'))

    def queries(images):
        with torch.no_grad():
            x = learner.preprocess(list(images))
            return learner.backbone.query(x, learner.config.query_layers)
    return (queries(data.train_images), torch.from_numpy(data.train_labels),
            queries(data.test_images), torch.from_numpy(data.test_labels))


def test_predictive_spread_rule_measured_with_counts_ten_to_one(digits_queries):
    """Why the score divides by 1 + 1/n and drops -D/2 log(1 + 1/n): with classes taught
    ten times less often than the others, the full predictive log-density over-penalises
    the rare classes, and ignoring the counts lets the frequent ones draw their frames."""
    x, y, probe, truth = digits_queries
    counts = torch.bincount(y)
    assert (counts[1::2] * 8 < counts[0::2]).all()  # odd classes thinned ~10x
    active = torch.ones(10, dtype=torch.bool)
    acc = {}
    for spread in ('scaled', 'full', 'none'):
        st = ClassStatistics(x.shape[1], 1, 0.1, spread=spread)
        st.grow(10)
        st.add(y, x)
        acc[spread] = (st.log_posterior(probe, active).argmax(1) == truth).float().mean().item()
    assert acc['scaled'] >= acc['full'] + 0.01 and acc['scaled'] >= acc['none'] + 0.01, acc
    with pytest.raises(ValueError, match='lda_spread'):
        ClassStatistics(4, 1, spread='half')
