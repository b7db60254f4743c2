"""Tests of the metrics, the plots and the progress bar (no ROS)."""


import numpy as np
import pytest

from ros2_cbpnet.learning.metrics import (average_accuracy, forgetting, format_matrix,
                                          learning_accuracy, prediction_accuracy, summarize)
from ros2_cbpnet.learning.plotting import plot_accuracy_curves

# Row i: accuracies on tasks 0..i after learning task i.
TRIANGLE = [
    [0.90],
    [0.70, 0.80],
    [0.60, 0.75, 0.95],
]
NAN = float('nan')
SQUARE_NAN = [
    [0.90, NAN, NAN],
    [0.70, 0.80, NAN],
    [0.60, 0.75, 0.95],
]
SQUARE_NONE = [
    [0.90, None, None],
    [0.70, 0.80, None],
    [0.60, 0.75, 0.95],
]

# By hand: final row mean (0.60 + 0.75 + 0.95) / 3.
EXPECTED_AVG = 2.30 / 3
# Task 0: best before the end max(0.90, 0.70) = 0.90, final 0.60 -> 0.30.
# Task 1: best before the end 0.80, final 0.75 -> 0.05. Mean 0.175.
EXPECTED_FORGETTING = 0.175
# Diagonal (0.90 + 0.80 + 0.95) / 3.
EXPECTED_LEARNING = 2.65 / 3


@pytest.mark.parametrize('matrix', [TRIANGLE, SQUARE_NAN, SQUARE_NONE, np.array(SQUARE_NAN)],
                         ids=['triangle', 'square-nan', 'square-none', 'numpy'])
def test_metrics_by_hand(matrix):
    assert average_accuracy(matrix) == pytest.approx(EXPECTED_AVG)
    assert forgetting(matrix) == pytest.approx(EXPECTED_FORGETTING)
    assert learning_accuracy(matrix) == pytest.approx(EXPECTED_LEARNING)
    assert summarize(matrix) == pytest.approx({
        'average_accuracy': EXPECTED_AVG,
        'forgetting': EXPECTED_FORGETTING,
        'learning_accuracy': EXPECTED_LEARNING,
    })


def test_forgetting_uses_best_earlier_accuracy_not_first():
    # Task 0 improves after task 1 (0.5 -> 0.9), then drops to 0.4: forgetting is 0.9 - 0.4.
    acc = [[0.5], [0.9, 0.8], [0.4, 0.8, 1.0]]
    assert forgetting(acc) == pytest.approx(((0.9 - 0.4) + (0.8 - 0.8)) / 2)


def test_one_task():
    assert forgetting([[0.8]]) == 0.0
    assert average_accuracy([[0.8]]) == pytest.approx(0.8)
    assert learning_accuracy([[0.8]]) == pytest.approx(0.8)


@pytest.mark.parametrize('bad', [
    [],
    [[0.9], [0.7]],                    # row 1 too short
    [[0.9, 0.1, 0.2], [0.7, 0.8]],     # row 0 longer than the number of tasks
    [[0.9], [0.7, 0.8, 0.1, 0.2]],
    [[0.9], [None, 0.8]],              # missing value inside the triangle
    [[0.9], [NAN, 0.8]],
    [[90.0], [70.0, 80.0]],            # percentages instead of fractions
    [[]],
])
def test_bad_matrix_raises(bad):
    with pytest.raises(ValueError):
        summarize(bad)


def test_ragged_message_names_the_row():
    with pytest.raises(ValueError, match='row 1'):
        average_accuracy([[0.9], [0.7], [0.6, 0.5, 0.4]])


def test_format_matrix():
    text = format_matrix(SQUARE_NAN)
    lines = text.splitlines()
    assert len(lines) == 4
    assert lines[0].split()[-3:] == ['T1', 'T2', 'T3']
    assert lines[1].split()[-3:] == ['90.0', '-', '-']
    assert lines[2].split()[-3:] == ['70.0', '80.0', '-']
    assert lines[3].split()[-3:] == ['60.0', '75.0', '95.0']
    # Columns line up: every line is equally long.
    assert len({len(line) for line in lines}) == 1
    named = format_matrix(TRIANGLE, ['digits 0-3', '4-6', '7-9'])
    assert 'after digits 0-3' in named
    with pytest.raises(ValueError):
        format_matrix(TRIANGLE, ['a', 'b'])


def test_plot_one_and_two_results(tmp_path):
    one = plot_accuracy_curves([{'method': 'cbp', 'acc_matrix': TRIANGLE, 'dataset': 'digits'}],
                               str(tmp_path / 'one.png'))
    two = plot_accuracy_curves(
        [{'method': 'cbp', 'acc_matrix': TRIANGLE, 'std': 0.1},
         {'method': 'finetune', 'acc_matrix': [[1.0], [0.0, 1.0]]}],
        str(tmp_path / 'sub' / 'two.png'), title='digits, 3 tasks')
    for path in (one, two):
        with open(path, 'rb') as fh:
            data = fh.read()
        assert data[:8] == b'\x89PNG\r\n\x1a\n'
        assert len(data) > 5000
    with pytest.raises(ValueError):
        plot_accuracy_curves([], str(tmp_path / 'none.png'))
    with pytest.raises(ValueError):
        plot_accuracy_curves([{'acc_matrix': TRIANGLE}], str(tmp_path / 'nomethod.png'))


def test_prediction_accuracy_is_closed_set_top1_over_batches():
    from types import SimpleNamespace

    calls = []

    def predict(batch, top_k):
        calls.append((len(batch), top_k))
        # The first frame is called unknown, but its top class is right: it counts.
        return [SimpleNamespace(label='unknown' if x == 0 else 'b', topk=[(str(x % 3), 0.9)])
                for x in batch]

    images = list(range(7))
    labels = ['0', '1', '2', '0', 'x', 'x', '0']
    assert prediction_accuracy(predict, images, labels, batch_size=3) == 5 / 7
    assert calls == [(3, 1), (3, 1), (1, 1)]
    assert np.isnan(prediction_accuracy(predict, [], []))
