"""The Efficient CBP Block: utility bookkeeping and re-initialisation (design.md 2.2)."""
import math

import pytest
import torch

from ros2_cbpnet.learning.model.cbp import CBPBlock


def _trained_block(dim=6, hidden=4, **kw):
    torch.manual_seed(0)
    block = CBPBlock(dim, hidden, **kw)
    with torch.no_grad():
        block.fc2.weight.normal_()
        block.fc2.bias.normal_()
    return block


def test_block_starts_as_identity():
    block = CBPBlock(8, 16)
    z = torch.randn(5, 8)
    assert torch.equal(block(z), z)


def test_utility_matches_hand_computation():
    block = _trained_block(decay_rate=0.9)
    block.train()
    x1, x2 = torch.randn(3, 6), torch.randn(5, 6)
    eta = 0.9
    expected_u = torch.zeros(4)
    expected_f = torch.zeros(4)
    for x in (x1, x2):
        block(x)
        a = torch.relu(x @ block.fc1.weight.T + block.fc1.bias)
        c = a.abs().mean(0) * block.fc2.weight.abs().sum(0)
        expected_u = eta * expected_u + (1 - eta) * c
        expected_f = eta * expected_f + (1 - eta) * a.mean(0)
        block.update_utility()
    assert torch.equal(block.age, torch.full((4,), 2))
    assert torch.allclose(block.utility, expected_u, atol=1e-6)
    assert torch.allclose(block.mean_activation, expected_f, atol=1e-6)
    corr = 1 - eta ** 2
    assert torch.allclose(block.corrected_utility(), expected_u / corr, atol=1e-6)


def _age(block, steps, x=None):
    block.train()
    for _ in range(steps):
        block(torch.randn(4, block.dim) if x is None else x)
        block.update_utility()


def test_immature_units_are_never_replaced():
    block = _trained_block(replacement_rate=1.0, maturity_threshold=10)
    _age(block, 10)  # age == threshold: not yet mature (age must exceed it)
    w1 = block.fc1.weight.clone()
    assert block.replace_units() == 0
    assert torch.equal(block.fc1.weight, w1)
    _age(block, 1)
    assert block.replace_units() == 4


def test_replacement_count_follows_the_accumulator():
    rate = 0.3
    block = _trained_block(dim=5, hidden=10, replacement_rate=rate, maturity_threshold=0)
    total, acc = 0, 0.0
    for _ in range(20):
        _age(block, 1)
        mature = int((block.age > 0).sum())
        acc += rate * mature
        expected = min(int(acc), mature)
        acc -= expected
        got = block.replace_units()
        assert got == expected
        total += got
    assert total == int(block.replacements_total) > 0
    assert math.isclose(float(block.accumulator), acc, abs_tol=1e-9)


def test_lowest_utility_unit_is_replaced_and_output_kept_by_bias_fold():
    block = _trained_block(dim=6, hidden=4, replacement_rate=0.25, maturity_threshold=0,
                           decay_rate=0.9)
    _age(block, 30)
    with torch.no_grad():
        block.utility.copy_(torch.tensor([0.5, 0.01, 0.7, 0.9]))  # unit 1 is least useful
    block.eval()
    x = torch.randn(7, 6)
    before = block(x)
    a = torch.relu(block.fc1(x))
    w2_col = block.fc2.weight[:, 1].clone()
    f_hat = block.corrected_mean_activation()[1].clone()
    w1_rows = block.fc1.weight.clone()
    assert block.replace_units() == 1
    after = block(x)
    # Output changes only by the removed unit's deviation from its mean activation.
    expected = before - (a[:, 1:2] - f_hat) * w2_col
    assert torch.allclose(after, expected, atol=1e-5)
    assert not torch.equal(block.fc1.weight[1], w1_rows[1])
    assert torch.equal(block.fc1.weight[[0, 2, 3]], w1_rows[[0, 2, 3]])
    assert block.fc1.bias[1] == 0 and torch.all(block.fc2.weight[:, 1] == 0)
    assert block.age[1] == 0 and block.utility[1] == 0 and block.mean_activation[1] == 0


def test_replaced_units_adam_moments_are_zeroed():
    block = _trained_block(dim=6, hidden=4, replacement_rate=0.25, maturity_threshold=0)
    opt = torch.optim.Adam(block.parameters(), lr=1e-3)
    block.train()
    for _ in range(5):
        loss = block(torch.randn(8, 6)).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        block.update_utility()
    with torch.no_grad():
        block.utility.copy_(torch.tensor([0.5, 0.6, 0.01, 0.9]))
    assert block.replace_units(opt) == 1
    s1, sb, s2 = (opt.state[p] for p in (block.fc1.weight, block.fc1.bias, block.fc2.weight))
    for key in ('exp_avg', 'exp_avg_sq'):
        assert torch.all(s1[key][2] == 0) and sb[key][2] == 0 and torch.all(s2[key][:, 2] == 0)
        assert torch.any(s1[key][0] != 0) and torch.any(s2[key][:, 0] != 0)


def test_disabled_block_never_replaces():
    block = _trained_block(replacement_rate=1.0, maturity_threshold=0, enabled=False)
    _age(block, 50)
    assert block.replace_units() == 0
    assert int(block.replacements_total) == 0


def test_state_is_in_the_state_dict_and_stats_are_readable():
    block = _trained_block(replacement_rate=0.5, maturity_threshold=0)
    _age(block, 3)
    block.replace_units()
    sd = block.state_dict()
    for key in ('age', 'utility', 'mean_activation', 'accumulator', 'replacements_total'):
        assert key in sd
    clone = CBPBlock(6, 4)
    clone.load_state_dict(sd)
    assert torch.equal(clone.age, block.age)
    stats = block.stats()
    assert stats['hidden_units'] == 4 and stats['replacements_total'] >= 1
    assert 0.0 <= stats['dormant_fraction'] <= 1.0
    assert stats['utility_min'] <= stats['utility_mean'] <= stats['utility_max']


@pytest.mark.parametrize('kw', [dict(hidden_units=0), dict(replacement_rate=-1e-4),
                                dict(maturity_threshold=-1), dict(decay_rate=1.0)])
def test_invalid_settings_are_refused(kw):
    args = dict(hidden_units=4)
    args.update(kw)
    with pytest.raises(ValueError):
        CBPBlock(6, **args)
