"""Mixed-precision training and inference settings: autocast, gradient scaling, clipping.

No ROS import here (the learner uses it). Three precisions:

- ``fp32``: no autocast (a ``nullcontext``), no scaler.
- ``bf16``: autocast to bfloat16. bf16 has fp32's exponent range, so gradients do not
  underflow and no scaler is needed. The CUDA default where the GPU computes bf16 natively
  (compute capability >= 8: Ampere, Ada, Hopper, Jetson Orin); see :func:`default_precision`.
- ``fp16``: autocast to float16 with a :class:`torch.amp.GradScaler`. fp16 flushes values
  below ~6e-8 to zero, and the gradients reaching small prompts are often that small, so
  without scaling they underflow silently and the prompts stop learning. The scaler multiplies
  the loss before ``backward``, unscales the gradients before clipping, and skips any step
  whose gradients overflowed (lowering the scale), as in the PyTorch AMP recipe. For GPUs
  without native bf16 (Volta/Turing, Jetson Xavier).

The call sequence in a training loop (this is what the learner's ``learn_task`` does)::

    prec = TrainingPrecision(device, config.precision)
    optimizer = torch.optim.Adam(params, lr=...)
    for batch in batches:
        with prec.autocast():
            loss = compute_loss(batch)          # forward passes under autocast
        if not torch.isfinite(loss):            # a diverging task is rolled back
            raise ...
        optimizer.zero_grad(set_to_none=True)
        prec.backward(loss)                     # scaled backward for fp16
        if prec.step(optimizer, params, clip_norm):   # unscale, clip, step (or skip)
            cbp.update_utility()                # CBP bookkeeping only after a real step
            replaced += cbp.replace_units(optimizer)
    # prec.skipped_steps: steps skipped for inf/NaN gradients (expected: a few at the
    # start of fp16 training while the scale settles; report it, warn when it is large)

Inference needs no scaler: ``with torch.inference_mode(), prec.autocast(): ...``.

Example:
    >>> prec = TrainingPrecision(torch.device('cpu'), 'fp32')
    >>> prec.uses_grad_scaler
    False
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Iterable, Optional

import torch

__all__ = ['PRECISIONS', 'TrainingPrecision', 'autocast_dtype', 'default_precision',
           'resolve_precision', 'supports_native_bf16']

#: The precisions a learner accepts.
PRECISIONS = ('fp32', 'fp16', 'bf16')
_DTYPES = {'fp16': torch.float16, 'bf16': torch.bfloat16}


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    """The autocast dtype of ``precision`` (None for fp32).

    Raises:
        ValueError: not one of :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f'precision must be one of {PRECISIONS}, not {precision!r}')
    return _DTYPES.get(precision)


def supports_native_bf16(device: torch.device) -> bool:
    """True for a CUDA device that computes bf16 in hardware (compute capability >= 8).

    ``torch.cuda.is_bf16_supported()`` alone is not enough: by default it also answers True
    for GPUs that only emulate bf16, where it is much slower than fp16.
    """
    device = torch.device(device)
    if device.type != 'cuda' or not torch.cuda.is_available():
        return False
    if torch.version.hip:
        return True
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_properties(index).major >= 8


def default_precision(device: torch.device) -> str:
    """The training/inference precision to use on ``device`` when none is asked for.

    CPU: ``fp32`` (CPU autocast gains little and costs accuracy). CUDA: ``bf16`` where the
    GPU has native bf16, else ``fp16`` (which :class:`TrainingPrecision` trains with a
    GradScaler).
    """
    device = torch.device(device)
    if device.type != 'cuda':
        return 'fp32'
    return 'bf16' if supports_native_bf16(device) else 'fp16'


def resolve_precision(precision: str, device: torch.device) -> str:
    """``'auto'`` -> :func:`default_precision`; anything else is checked and returned.

    Raises:
        ValueError: not ``auto`` and not one of :data:`PRECISIONS`.
    """
    if precision == 'auto':
        return default_precision(device)
    autocast_dtype(precision)
    return precision


class TrainingPrecision:
    """Autocast, backward, unscale-clip-step for one device and precision.

    Args:
        device: where the model runs. CUDA for fp16/bf16 in production; CPU autocast and the
            CPU GradScaler also work (slowly), which is what the unit tests use.
        precision: ``fp32``, ``fp16`` or ``bf16`` (``auto`` resolves by device).
        init_scale: the GradScaler's initial loss scale (fp16 only; PyTorch's default).

    Raises:
        ValueError: unknown precision.
    """

    def __init__(self, device: torch.device, precision: str, *,
                 init_scale: float = 2.0 ** 16) -> None:
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device)
        self.dtype = autocast_dtype(self.precision)
        self._scaler: Optional[torch.amp.GradScaler] = None
        if self.precision == 'fp16':
            self._scaler = torch.amp.GradScaler(self.device.type, init_scale=init_scale)
        self.steps = 0
        self.skipped_steps = 0

    @property
    def uses_grad_scaler(self) -> bool:
        """True when gradients are scaled (fp16 training)."""
        return self._scaler is not None

    @property
    def scale(self) -> Optional[float]:
        """The current loss scale (None without a scaler)."""
        return float(self._scaler.get_scale()) if self._scaler is not None else None

    def autocast(self) -> ContextManager:
        """The autocast context of this precision (fp32: a no-op context)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, with the loss multiplied by the current scale for fp16."""
        if self._scaler is not None:
            self._scaler.scale(loss).backward()
        else:
            loss.backward()

    def step(self, optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor],
             clip_norm: Optional[float]) -> bool:
        """Unscale (fp16), clip the gradient norm to ``clip_norm`` (None: no clipping), step.

        A step whose gradients hold inf or NaN is skipped in every precision (fp16: the
        scaler also halves its scale); the optimiser state is then untouched.

        Returns:
            True when the optimiser stepped, False when the step was skipped.
        """
        params = [p for p in params if p.grad is not None]
        self.steps += 1
        if self._scaler is not None:
            # Clipping must see true gradients, so unscale first (PyTorch AMP recipe).
            self._scaler.unscale_(optimizer)
            if clip_norm is not None and params:
                torch.nn.utils.clip_grad_norm_(params, clip_norm)
            scale_before = self._scaler.get_scale()
            self._scaler.step(optimizer)  # skips optimizer.step() on inf/NaN gradients
            self._scaler.update()
            # update() lowers the scale exactly when the step was skipped.
            taken = self._scaler.get_scale() >= scale_before
        else:
            if clip_norm is not None and params:
                norm = torch.nn.utils.clip_grad_norm_(params, clip_norm)
            else:
                norm = _total_norm(params)
            taken = bool(torch.isfinite(norm))
            if taken:
                optimizer.step()
        if not taken:
            self.skipped_steps += 1
        return taken

    def state_dict(self) -> dict:
        """The scaler state (empty without one), e.g. to carry the scale across tasks."""
        return self._scaler.state_dict() if self._scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (ignored without a scaler)."""
        if self._scaler is not None and state:
            self._scaler.load_state_dict(state)

    def __repr__(self) -> str:
        return (f'TrainingPrecision(device={self.device}, precision={self.precision!r}, '
                f'grad_scaler={self.uses_grad_scaler})')


def _total_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    return torch.stack([g.to(grads[0].device) for g in grads]).norm()
