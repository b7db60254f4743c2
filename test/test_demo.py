"""The demo's replay logic end to end through the real node process (tiny subset)."""
import json

import pytest

from ros2_cbpnet.tools import demo

pytestmark = [pytest.mark.slow, pytest.mark.ros]


def test_demo_replays_tasks_through_the_node_and_survives_restarts(tmp_path, capsys):
    out = tmp_path / 'out'
    code = demo.main(['--dataset', 'digits', '--tasks', '2', '--train-per-class', '12',
                      '--test-per-class', '6', '--epochs', '3', '--image-size', '48',
                      '--restart-between-tasks', '--out-dir', str(out), '--timeout-s', '120'])
    assert code == 0, (out / 'node.log').read_text()[-3000:]
    summary = json.loads((out / 'demo_summary.json').read_text())
    assert [len(row) for row in summary['acc_matrix']] == [1, 2]
    assert summary['missing_predictions'] == 0
    # 5 classes per task: chance is 0.2 within a task, 0.1 over both.
    assert summary['average_accuracy'] > 0.4
    assert summary['task_results'][1]['task_id'] == 1
    assert summary['learner']['model_version'] == 2
    assert summary['cbp']['hidden_units'] == 64
    # The node's default recipe (statistics) sends no frame through the block, and says so.
    assert summary['cbp']['in_use'] is False
    assert 'CBP block: not in use' in capsys.readouterr().out
    restart = summary['restarts'][0]
    assert restart['exit_code'] == 0 and restart['labels']['model_version'] == 1
    assert restart['accuracy_after'][0] == pytest.approx(restart['accuracy_before'][0],
                                                         abs=0.1)
    assert summary['node_exit_code'] == 0
    assert (out / 'demo_accuracy.png').stat().st_size > 1000


def test_bad_dataset_is_a_clear_error(capsys, tmp_path):
    assert demo.main(['--dataset', 'folder:/nonexistent', '--out-dir', str(tmp_path)]) == 2
    assert 'nonexistent' in capsys.readouterr().err
