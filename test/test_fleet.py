"""Fleet statistics without ROS: what robots share merges exactly, comes back out exactly, is
encoded safely, and anything malformed is refused before it touches a model."""
import copy
import struct

import numpy as np
import pytest

from ros2_cbpnet.learning import fleet
from ros2_cbpnet.learning.datasets import task_subset
from ros2_cbpnet.learning.fleet import Contribution, FleetRefused, compact_scatter, decode, encode
from ros2_cbpnet.learning.learner import ContinualLearner, LearnerConfig, LearningError
from ros2_cbpnet.learning.model import load_backbone

TASKS_A = ([0, 1], [2, 3])
TASK_B = [4, 5]


@pytest.fixture(scope='module')
def backbone():
    return load_backbone('tf_efficientnet_lite0', image_size=64)


def _learner(backbone, **kw):
    return ContinualLearner(LearnerConfig(image_size=64, device='cpu', **kw), backbone=backbone)


def _task(ds, classes, split='train'):
    images = ds.train_images if split == 'train' else ds.test_images
    labels = ds.train_labels if split == 'train' else ds.test_labels
    x, y = task_subset(images, labels, classes)
    return list(x), [ds.classes[i] for i in y]


def _relative(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _same_statistics(a, b):
    """Per class (by name) counts and means, and the shared scatter, to float tolerance."""
    assert sorted(a.classes) == sorted(b.classes)
    sa, sb = a.state.stats, b.state.stats
    ia = [list(a._snapshot.classes).index(c) for c in b.classes]
    ib = [list(b._snapshot.classes).index(c) for c in b.classes]
    assert sa.class_count[ia].tolist() == sb.class_count[ib].tolist()
    assert _relative(sa.query_mean[ia], sb.query_mean[ib]) < 1e-6
    assert _relative(sa.query_scatter, sb.query_scatter) < 1e-6


@pytest.fixture(scope='module')
def fleet_of_three(backbone, digits):
    """A taught two tasks and B one (exporting), C everything locally; A and B exchange."""
    a, b, c = (_learner(backbone) for _ in range(3))
    exports = {'A': [], 'B': []}
    for k, classes in enumerate(TASKS_A):
        result = a.learn_task(*_task(digits, classes), origin='A', export=('A', k + 1))
        exports['A'].append(result.contribution)
    result = b.learn_task(*_task(digits, TASK_B), origin='B', export=('B', 1))
    exports['B'].append(result.contribution)
    for classes in TASKS_A + (TASK_B,):
        c.learn_task(*_task(digits, classes))
    wire = {robot: [encode(x) for x in xs] for robot, xs in exports.items()}
    for data in wire['A']:
        b.import_contribution(decode(data))
    for data in wire['B']:
        a.import_contribution(decode(data))
    return a, b, c, wire


def test_exchanged_statistics_equal_one_robot_taught_everything(fleet_of_three, digits):
    a, b, c, _ = fleet_of_three
    _same_statistics(a, c)
    _same_statistics(b, c)
    images, _ = _task(digits, [0, 1, 2, 3, 4, 5], 'test')
    labels = {name: [p.topk[0][0] for p in learner.predict(images)]
              for name, learner in (('a', a), ('b', b), ('c', c))}
    for name in ('a', 'b'):
        agree = np.mean([x == y for x, y in zip(labels[name], labels['c'])])
        assert agree >= 0.99, (name, agree)
    assert b.fleet_ledger.origin_map()['0'] == ['A'] and a.fleet_ledger.origin_map()['4'] == ['B']
    assert b.fleet_ledger.applied == (('A', 1), ('A', 2)) and a.fleet_ledger.exported == (1, 2)


def test_import_is_idempotent_undoable_and_withdrawable(fleet_of_three, backbone):
    _, _, _, wire = fleet_of_three
    b = _learner(backbone)
    for data in (wire['B'][0], wire['A'][0], wire['A'][1]):
        b.import_contribution(decode(data))
    version = b.model_version
    with pytest.raises(LearningError, match='already in the model'):
        b.import_contribution(decode(wire['A'][1]))
    assert b.model_version == version
    # A undid its second task: B takes those statistics back out, exactly.
    second = decode(wire['A'][1])
    b.withdraw_contribution(second.as_withdraw(3))
    assert ('A', 2) not in b.fleet_ledger.applied and b.model_version == version + 1
    assert '2' not in b.classes and '3' not in b.classes and '0' in b.classes
    assert '2' not in b.fleet_ledger.origin_map()
    fresh = _learner(backbone)
    fresh.import_contribution(decode(wire['B'][0]))
    fresh.import_contribution(decode(wire['A'][0]))
    names = ('0', '1', '4', '5')
    idx = [list(b._snapshot.classes).index(name) for name in names]
    fidx = [list(fresh._snapshot.classes).index(name) for name in names]
    assert _relative(b.state.stats.query_mean[idx], fresh.state.stats.query_mean[fidx]) < 1e-5
    assert _relative(b.state.stats.query_scatter, fresh.state.stats.query_scatter) < 1e-5
    with pytest.raises(LearningError, match='not in the model'):
        b.withdraw_contribution(second.as_withdraw(4))
    # Undo of an import: the model goes back, and its tag is declined, so a re-share by its
    # robot does not bring it back.
    undone = b.undo_last_task()
    assert undone['removed_classes'] == ['0', '1']
    assert ('A', 1) not in b.fleet_ledger.applied and ['A', 1] in b.fleet_meta['declined']
    assert b.classes == ['4', '5']


def test_refused_contributions_change_nothing(fleet_of_three, backbone):
    a, b, c, wire = fleet_of_three
    other = ContinualLearner(LearnerConfig(image_size=48, device='cpu'), backbone=backbone)
    with pytest.raises(LearningError, match='another feature'):
        other.import_contribution(decode(wire['A'][0]))
    assert other.num_tasks == 0 and other.model_version == 0


def test_ledger_and_fleet_bookkeeping_survive_a_checkpoint(fleet_of_three, backbone, tmp_path):
    a, b, c, wire = fleet_of_three
    b.fleet_meta['next_sequence'] = 7
    path = b.save_checkpoint(str(tmp_path))
    restored = _learner(backbone)
    assert restored.load_latest_checkpoint(str(tmp_path)) == path
    assert restored.fleet_ledger == b.fleet_ledger
    assert restored.fleet_meta['next_sequence'] == 7
    _same_statistics(restored, b)


def test_compact_scatter_is_exact_and_smaller():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(30, 200))
    rows -= rows.mean(0)
    form, factor = compact_scatter(rows)
    assert form == 'factor' and factor.shape[0] <= 30 and factor.shape[1] == 200
    c = Contribution('task', 'r', 1, '0' * 64, ['x'], np.array([30]),
                     np.zeros((1, 200), np.float32), form, factor)
    assert np.allclose(fleet.scatter_matrix(c), rows.T @ rows, rtol=1e-5, atol=1e-4)
    wide = rng.normal(size=(300, 20))
    form, packed = compact_scatter(wide)
    c = Contribution('task', 'r', 1, '0' * 64, ['x'], np.array([300]),
                     np.zeros((1, 20), np.float32), form, packed)
    assert form == 'packed' and packed.shape == (210,)
    assert np.allclose(fleet.scatter_matrix(c), wide.T @ wide, rtol=1e-5, atol=1e-3)


def _valid():
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(6, 8))
    form, scatter = compact_scatter(rows)
    return Contribution('task', 'robot_a', 3, 'ab' * 32, ['cup', 'mug'], np.array([3, 3]),
                        rng.normal(size=(2, 8)).astype(np.float32), form, scatter,
                        (1.5, 4.0, 6), created=1.0)


def test_codec_round_trip():
    c = _valid()
    back = decode(encode(c))
    assert back.tag == ('robot_a', 3) and back.classes == ['cup', 'mug']
    assert np.array_equal(back.counts, c.counts) and np.array_equal(back.means, c.means)
    assert np.array_equal(back.scatter, c.scatter) and back.novelty == (1.5, 4.0, 6)
    forget = Contribution('forget', 'robot_a', 4, 'ab' * 32, forget='cup')
    assert decode(encode(forget)).forget == 'cup'


def _mutations(data: bytes):
    """Malformed variants of a valid contribution: (description, bytes, expected reason)."""
    head_len = struct.unpack('>I', data[5:9])[0]
    yield 'empty', b'', 'malformed'
    yield 'magic', b'XXXX' + data[4:], 'malformed'
    yield 'version', data[:4] + bytes([9]) + data[5:], 'version'
    yield 'header length', data[:5] + struct.pack('>I', 10 ** 8) + data[9:], 'malformed'
    yield 'oversized', data + b'\0' * 1000, 'oversized'
    rng = np.random.default_rng(7)
    for k in range(40):
        cut = int(rng.integers(0, len(data)))
        yield f'truncated at {cut}', data[:cut], None
    for k in range(120):
        pos = int(rng.integers(0, len(data)))
        flipped = bytearray(data)
        flipped[pos] ^= 1 << int(rng.integers(0, 8))
        yield f'bit flip at {pos}', bytes(flipped), None
    head = data[9:9 + head_len]
    for k in range(40):
        junk = bytearray(head)
        junk[int(rng.integers(0, len(head)))] = int(rng.integers(0, 256))
        yield f'header byte {k}', data[:5] + struct.pack('>I', len(junk)) + bytes(junk) + \
            data[9 + head_len:], None


def _rebuilt(c, **changes):
    out = copy.deepcopy(c)
    for k, v in changes.items():
        setattr(out, k, v)
    return encode(out)


def test_malformed_contributions_are_refused_with_a_reason():
    c = _valid()
    data = encode(c)
    cases = list(_mutations(data))
    inconsistent = [
        _rebuilt(c, counts=np.array([3, -1])), _rebuilt(c, counts=np.array([3])),
        _rebuilt(c, means=np.full((2, 8), np.nan, np.float32)),
        _rebuilt(c, scatter=np.ones((9, 8), np.float32)),
        _rebuilt(c, classes=['cup', 'cup']), _rebuilt(c, kind='merge'),
        _rebuilt(c, fingerprint='short'), _rebuilt(c, scatter_form='dense'),
        _rebuilt(c, novelty=(1.0, -5.0, 6)), _rebuilt(c, robot_id=' '),
        _rebuilt(c, kind='withdraw', withdraws=5), _rebuilt(c, kind='forget', forget=''),
    ]
    cases += [(f'inconsistent {k}', x, 'inconsistent') for k, x in enumerate(inconsistent)]
    assert len(cases) >= 200
    for what, blob, reason in cases:
        with pytest.raises(FleetRefused) as exc:
            decode(blob, max_bytes=len(data) + 500)
        assert exc.value.reason in fleet.REFUSALS, what
        if reason is not None:
            assert exc.value.reason == reason, (what, exc.value.reason, exc.value.detail)
