"""TrainingPrecision: fp16 trains through a GradScaler (unscale before clipping, skip steps on
inf/NaN), bf16 and fp32 without one, and the CUDA default precision.

Runs on CPU: recent torch has CPU autocast for fp16/bf16 and ``torch.amp.GradScaler('cpu')``.
"""
import types

import pytest
import torch

from ros2_cbpnet.learning import precision as prec_mod
from ros2_cbpnet.learning.precision import (TrainingPrecision, autocast_dtype, default_precision,
                                            resolve_precision)

CPU = torch.device('cpu')


def _tiny(seed=0, bias=False):
    torch.manual_seed(seed)
    return torch.nn.Linear(8, 1, bias=bias)


def test_fp16_uses_a_grad_scaler_and_autocasts():
    p = TrainingPrecision(CPU, 'fp16')
    assert p.uses_grad_scaler and p.scale == 2.0 ** 16
    m = _tiny()
    with p.autocast():
        y = m(torch.ones(2, 8))
    assert y.dtype == torch.float16


@pytest.mark.parametrize('precision, dtype', [('fp32', torch.float32), ('bf16', torch.bfloat16)])
def test_fp32_and_bf16_need_no_scaler(precision, dtype):
    p = TrainingPrecision(CPU, precision)
    assert not p.uses_grad_scaler and p.scale is None and p.state_dict() == {}
    with p.autocast():
        y = _tiny()(torch.ones(2, 8))
    assert y.dtype == dtype


def test_scaler_keeps_gradients_that_fp16_would_flush_to_zero():
    """The reason for the scaler: a 4e-9 gradient underflows in fp16 without it."""
    x = torch.full((4, 8), 1e-3)
    grads = {}
    for scaled in (False, True):
        m = _tiny()
        p = TrainingPrecision(CPU, 'fp16')
        with p.autocast():
            loss = 1e-6 * m(x).float().sum()
        if scaled:
            p.backward(loss)
            grads[scaled] = m.weight.grad / p.scale
        else:
            loss.backward()
            grads[scaled] = m.weight.grad
    assert torch.count_nonzero(grads[False]) == 0
    assert torch.allclose(grads[True], torch.full_like(grads[True], 4e-9), rtol=0.01)


def test_backward_scales_and_step_unscales_before_clipping():
    """SGD with lr 1 moves the weight by exactly the (clipped) true gradient."""
    x = torch.ones(4, 8)
    for clip, expect_norm in ((100.0, None), (0.5, 0.5)):
        m = _tiny()
        w0 = m.weight.detach().clone()
        p = TrainingPrecision(CPU, 'fp16', init_scale=1024.0)
        opt = torch.optim.SGD(m.parameters(), lr=1.0)
        with p.autocast():
            loss = m(x).float().sum()  # true gradient: 4 per weight, norm 4 * sqrt(8)
        p.backward(loss)
        assert torch.allclose(m.weight.grad, torch.full_like(w0, 4.0 * 1024.0))
        assert p.step(opt, m.parameters(), clip) is True
        delta = w0 - m.weight.detach()
        if expect_norm is None:  # not clipped: the unscaled true gradient
            assert torch.allclose(delta, torch.full_like(w0, 4.0), rtol=1e-3)
        else:  # clipped on true gradients, so the scale does not shrink the update
            assert delta.norm().item() == pytest.approx(expect_norm, rel=1e-3)
        assert p.skipped_steps == 0 and p.steps == 1


@pytest.mark.parametrize('bad', [float('inf'), float('nan')])
def test_non_finite_gradient_skips_the_step_and_lowers_the_scale(bad):
    m = _tiny()
    p = TrainingPrecision(CPU, 'fp16', init_scale=1024.0)
    opt = torch.optim.Adam(m.parameters(), lr=0.1)
    with p.autocast():
        loss = m(torch.ones(2, 8)).float().sum()
    p.backward(loss)
    m.weight.grad[0, 0] = bad
    w0 = m.weight.detach().clone()
    assert p.step(opt, m.parameters(), 1.0) is False
    assert torch.equal(m.weight.detach(), w0)
    assert not opt.state  # Adam never ran: no moments, no step counter
    assert p.skipped_steps == 1 and p.scale == 512.0
    # the next, finite step goes through at the lowered scale
    opt.zero_grad(set_to_none=True)
    with p.autocast():
        loss = m(torch.ones(2, 8)).float().sum()
    p.backward(loss)
    assert p.step(opt, m.parameters(), 1.0) is True
    assert not torch.equal(m.weight.detach(), w0)
    assert p.skipped_steps == 1 and p.steps == 2


@pytest.mark.parametrize('precision', ['fp32', 'bf16'])
def test_unscaled_precisions_also_skip_non_finite_steps(precision):
    m = _tiny()
    p = TrainingPrecision(CPU, precision)
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    with p.autocast():
        loss = m(torch.ones(2, 8)).float().sum()
    p.backward(loss)
    assert torch.allclose(m.weight.grad.float(), torch.full((1, 8), 2.0))  # not scaled
    m.weight.grad[0, 1] = float('nan')
    w0 = m.weight.detach().clone()
    assert p.step(opt, m.parameters(), 1.0) is False
    assert torch.equal(m.weight.detach(), w0) and p.skipped_steps == 1
    opt.zero_grad()
    with p.autocast():
        loss = m(torch.ones(2, 8)).float().sum()
    p.backward(loss)
    assert p.step(opt, m.parameters(), None) is True
    assert torch.allclose(w0 - m.weight.detach(), torch.full_like(w0, 2.0))


def test_fp16_training_loop_learns_on_cpu():
    """The documented call sequence trains a small regression under fp16 + scaler."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    x = torch.randn(64, 8)
    y = x[:, :1] * 0.5 - x[:, 1:2]
    p = TrainingPrecision(CPU, 'fp16')
    opt = torch.optim.Adam(m.parameters(), lr=0.01)
    losses = []
    for _ in range(60):
        with p.autocast():
            loss = torch.nn.functional.mse_loss(m(x).float(), y)
        opt.zero_grad(set_to_none=True)
        p.backward(loss)
        p.step(opt, m.parameters(), 1.0)
        losses.append(float(loss.detach()))
    assert p.uses_grad_scaler and p.steps == 60
    assert p.skipped_steps < 10  # a few while the initial scale settles, not the whole run
    assert losses[-1] < 0.5 * losses[0]
    state = p.state_dict()
    q = TrainingPrecision(CPU, 'fp16')
    q.load_state_dict(state)
    assert q.scale == p.scale


def test_default_precision_by_device(monkeypatch):
    assert default_precision(CPU) == 'fp32'
    assert resolve_precision('auto', CPU) == 'fp32'
    assert resolve_precision('fp16', CPU) == 'fp16'
    # a CUDA device, faked: bf16 from compute capability 8 on, fp16 below (no native bf16)
    major = {'value': 8}
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'current_device', lambda: 0)
    monkeypatch.setattr(torch.cuda, 'get_device_properties',
                        lambda index: types.SimpleNamespace(major=major['value']))
    monkeypatch.setattr(torch.version, 'hip', None)
    cuda = torch.device('cuda:0')
    assert prec_mod.supports_native_bf16(cuda)
    assert default_precision(cuda) == 'bf16' and resolve_precision('auto', cuda) == 'bf16'
    major['value'] = 7  # Volta / Turing / Jetson Xavier
    assert default_precision(cuda) == 'fp16'


def test_bad_precision_is_refused():
    with pytest.raises(ValueError, match='precision must be one of'):
        TrainingPrecision(CPU, 'fp8')
    with pytest.raises(ValueError):
        autocast_dtype('half')
    assert autocast_dtype('fp32') is None and autocast_dtype('bf16') is torch.bfloat16


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_cuda_fp16_uses_the_cuda_scaler():
    m = _tiny().cuda()
    p = TrainingPrecision(torch.device('cuda'), 'fp16')
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with p.autocast():
        loss = m(torch.ones(2, 8, device='cuda')).float().sum()
    p.backward(loss)
    assert p.uses_grad_scaler and p.step(opt, m.parameters(), 1.0) in (True, False)
    assert p.steps == 1
