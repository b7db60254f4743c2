"""The plasticity protocol on a tiny synthetic stream: it must see plasticity loss where it
happens, and continual backpropagation must remove it (Dohare et al., Nature 2024)."""
import numpy as np
import pytest
import torch

from ros2_cbpnet.learning.learner import LearnerConfig
from ros2_cbpnet.tools.eval_plasticity import FrozenInputs, run_plasticity


def _stream(seed, classes=10, dim=256, per_class=(60, 30)):
    """Sparse non-negative features in many dimensions, like a CNN's pooled ReLU output."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0.0, 3.0 / np.sqrt(dim) * 3, (classes, dim))

    def draw(n):
        y = np.repeat(np.arange(classes), n)
        x = np.maximum(means[y] + rng.normal(0.0, 1.0, (len(y), dim)), 0.0)
        return torch.tensor(x, dtype=torch.float32), y
    (xtr, ytr), (xte, yte) = draw(per_class[0]), draw(per_class[1])
    return FrozenInputs(xtr, ytr, xte, yte)


# A large step size makes the hidden units die within a few tasks (every pre-activation
# moves by lr * sum|z| per Adam step), so the loss shows on a short stream.
FAST_DECAY = dict(cbp_hidden_units=16, learning_rate=0.1, epochs=5, cbp_replacement_rate=0.01,
                  cbp_maturity_threshold=20)


def _run(inputs, cbp, path):
    return run_plasticity(inputs, LearnerConfig(cbp_enabled=cbp, **FAST_DECAY), path=path,
                          num_tasks=30, train_per_class=60, test_per_class=30)


@pytest.mark.parametrize('seed', [0])
def test_cbp_removes_the_plasticity_loss_of_a_plain_hidden_layer(seed):
    inputs = _stream(seed)
    off = _run(inputs, False, 'no-skip')
    on = _run(inputs, True, 'no-skip')
    # Without replacement every hidden unit ends dead and new pairs are learned at chance.
    assert off['lifetime'][-1]['dormant_fraction_zero'] == 1.0
    assert off['last10_learning_accuracy'] <= 0.6 < off['first10_learning_accuracy']
    assert off['replaced_units'] == 0
    # With it, dead units are replaced and late tasks are learned as well as the first.
    assert on['replaced_units'] > 0
    assert on['last10_learning_accuracy'] >= 0.95
    assert on['last10_learning_accuracy'] >= on['first10_learning_accuracy'] - 0.03
    assert on['last10_dormant_fraction_zero'] < 1.0


def test_the_skip_connection_keeps_learning_whatever_the_hidden_units_do():
    res = _run(_stream(0), False, 'residual')
    assert res['last10_learning_accuracy'] >= 0.95
    assert res['lifetime'][-1]['dormant_fraction_zero'] == 1.0  # the block itself died


def test_rows_and_summaries():
    res = run_plasticity(_stream(2), LearnerConfig(epochs=1, cbp_hidden_units=8), num_tasks=3,
                         train_per_class=10, test_per_class=5)
    assert [r['task'] for r in res['lifetime']] == [0, 1, 2]
    for row in res['lifetime']:
        assert len(set(row['classes'])) == 2
        assert 0 <= row['effective_rank'] <= 8
    assert res['last10_learning_accuracy'] == pytest.approx(
        np.mean([r['learning_accuracy'] for r in res['lifetime']]))
    with pytest.raises(ValueError, match='path'):
        run_plasticity(_stream(2), LearnerConfig(), path='sideways')
