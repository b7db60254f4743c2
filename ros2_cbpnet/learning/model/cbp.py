"""The Efficient CBP Block: a residual bottleneck whose hidden units are kept plastic.

``z' = z + W2 relu(W1 z + b1) + b2`` with ``W2``/``b2`` zero at start (the block is the
identity). Every hidden unit carries continual-backpropagation state (Dohare et al.,
"Loss of plasticity in deep continual learning", Nature 2024): its age, a running
*contribution utility* and a running mean activation, all decayed with ``decay_rate`` and
bias-corrected by ``1 - decay_rate ** age``. After each optimiser step a fraction
``replacement_rate`` of the mature units (age > ``maturity_threshold``) is accumulated and
the integer part of the accumulator is replaced: the least useful mature units get fresh
input weights, zero outgoing weights, and their mean contribution is folded into ``b2`` so
the block's output moves as little as possible.

Adam note: torch's Adam keeps one step counter per tensor, not per unit. A replaced unit's
moments are zeroed but it shares the tensor's (large) step count, so its bias correction
is ~1 at once and its first updates are up to ``(1 - beta1) / sqrt(1 - beta2)`` (about
3x) the usual first Adam step. Dohare et al.'s AdamGnT resets a per-unit counter instead;
we accept the difference because the learner re-creates the optimiser for every task and
gradient clipping bounds the raw gradient.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
from torch import nn

__all__ = ['CBPBlock']


class CBPBlock(nn.Module):
    """Residual bottleneck MLP with utility-driven re-initialisation of hidden units.

    Args:
        dim: feature size in and out.
        hidden_units: bottleneck width h.
        replacement_rate: fraction of mature units replaced per optimiser step (rho).
        maturity_threshold: steps a unit must live before it may be replaced (m).
        decay_rate: running-average decay of utility and mean activation (eta).
        enabled: False keeps the same block but never replaces a unit (DualPrompt baseline).

    Example:
        >>> block = CBPBlock(8, hidden_units=4)
        >>> block(torch.zeros(2, 8)).shape
        torch.Size([2, 8])
    """

    def __init__(self, dim: int, hidden_units: int = 64, *, replacement_rate: float = 1e-4,
                 maturity_threshold: int = 100, decay_rate: float = 0.99,
                 enabled: bool = True) -> None:
        super().__init__()
        if hidden_units < 1:
            raise ValueError('hidden_units must be >= 1')
        if not 0.0 <= replacement_rate <= 1.0:
            raise ValueError('replacement_rate must be in [0, 1]')
        if maturity_threshold < 0:
            raise ValueError('maturity_threshold must be >= 0')
        if not 0.0 < decay_rate < 1.0:
            raise ValueError('decay_rate must be in (0, 1)')
        self.dim = dim
        self.hidden_units = hidden_units
        self.replacement_rate = float(replacement_rate)
        self.maturity_threshold = int(maturity_threshold)
        self.decay_rate = float(decay_rate)
        self.enabled = bool(enabled)
        self.fc1 = nn.Linear(dim, hidden_units)
        self.fc2 = nn.Linear(hidden_units, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)
        self.register_buffer('age', torch.zeros(hidden_units, dtype=torch.long))
        self.register_buffer('utility', torch.zeros(hidden_units))
        self.register_buffer('mean_activation', torch.zeros(hidden_units))
        self.register_buffer('accumulator', torch.zeros((), dtype=torch.float64))
        self.register_buffer('replacements_total', torch.zeros((), dtype=torch.long))
        self._activation: Optional[torch.Tensor] = None

    def forward(self, z: torch.Tensor, residual: bool = True) -> torch.Tensor:
        """Apply the block; in training mode remember the hidden activations.

        ``residual=False`` drops the skip connection (``W2 relu(W1 z + b1) + b2`` alone), so
        every bit of the output passes the hidden units, as in a plain hidden layer (the
        plasticity protocol's control: there dormant units cost capacity).
        """
        a = torch.relu(self.fc1(z))
        if self.training:
            self._activation = a.detach()
        out = self.fc2(a)
        return z + out if residual else out

    def _bias_correction(self) -> torch.Tensor:
        corr = 1.0 - torch.pow(torch.tensor(self.decay_rate, dtype=torch.float64),
                               self.age.double())
        return corr.to(self.utility.dtype)

    def corrected_utility(self) -> torch.Tensor:
        """Bias-corrected contribution utility per unit (0 for units of age 0)."""
        corr = self._bias_correction()
        return torch.where(self.age > 0, self.utility / corr.clamp_min(1e-12),
                           torch.zeros_like(self.utility))

    def corrected_mean_activation(self) -> torch.Tensor:
        """Bias-corrected running mean activation per unit (0 for units of age 0)."""
        corr = self._bias_correction()
        return torch.where(self.age > 0, self.mean_activation / corr.clamp_min(1e-12),
                           torch.zeros_like(self.mean_activation))

    @torch.no_grad()
    def hidden(self, z: torch.Tensor) -> torch.Tensor:
        """The hidden units' activations ``relu(W1 z + b1)`` for a batch (no side effects)."""
        return torch.relu(self.fc1(z))

    def discard_activation(self) -> None:
        """Drop the remembered activations of a batch whose optimiser step was skipped."""
        self._activation = None

    @torch.no_grad()
    def update_utility(self) -> None:
        """Fold the last training batch into age, utility and mean activation.

        Contribution utility of unit i: ``mean_batch |a_i| * sum_k |W2[k, i]|``.
        """
        a = self._activation
        if a is None:
            return
        self._activation = None
        a = a.reshape(-1, self.hidden_units).float()
        contribution = a.abs().mean(0) * self.fc2.weight.detach().abs().sum(0).float()
        eta = self.decay_rate
        self.age += 1
        self.utility.mul_(eta).add_((1.0 - eta) * contribution.to(self.utility.dtype))
        self.mean_activation.mul_(eta).add_((1.0 - eta) * a.mean(0).to(self.utility.dtype))

    @torch.no_grad()
    def replace_units(self, optimizer: Optional[torch.optim.Optimizer] = None) -> int:
        """Replace the least useful mature units; call after ``optimizer.step()``.

        Returns:
            The number of units replaced at this step (0 while disabled).
        """
        if not self.enabled or self.replacement_rate <= 0.0:
            return 0
        mature = self.age > self.maturity_threshold
        num_mature = int(mature.sum())
        if num_mature == 0:
            return 0
        self.accumulator += self.replacement_rate * num_mature
        count = min(int(self.accumulator.item()), num_mature)
        if count == 0:
            return 0
        self.accumulator -= count
        utility = self.corrected_utility().masked_fill(~mature, float('inf'))
        units = torch.topk(utility, count, largest=False).indices
        self._reinitialise(units, optimizer)
        self.replacements_total += count
        return count

    @torch.no_grad()
    def _reinitialise(self, units: torch.Tensor, optimizer: Optional[torch.optim.Optimizer]
                      ) -> None:
        w1, b1, w2, b2 = self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias
        # The removed units' average output moves into the bias, so on average the block's
        # output does not jump (Dohare et al. 2024, "mean contribution").
        b2 += w2[:, units] @ self.corrected_mean_activation()[units].to(w2.dtype)
        fresh = torch.empty(len(units), self.dim, dtype=w1.dtype, device=w1.device)
        nn.init.kaiming_uniform_(fresh, a=math.sqrt(5))  # nn.Linear's own initialisation
        w1[units] = fresh
        b1[units] = 0.0
        w2[:, units] = 0.0
        self.age[units] = 0
        self.utility[units] = 0.0
        self.mean_activation[units] = 0.0
        if optimizer is not None:
            for param, index in ((w1, (units,)), (b1, (units,)), (w2, (slice(None), units))):
                state = optimizer.state.get(param, {})
                for key in ('exp_avg', 'exp_avg_sq', 'max_exp_avg_sq'):
                    moment = state.get(key)
                    if isinstance(moment, torch.Tensor) and moment.shape == param.shape:
                        moment[index] = 0.0

    def stats(self, dormant_fraction_of_mean: float = 0.01) -> Dict[str, float]:
        """Summary for diagnostics.

        A unit counts as dormant when its corrected utility is at most
        ``dormant_fraction_of_mean`` times the block's mean utility (scale-free, so it
        means the same for any backbone).
        """
        u = self.corrected_utility().float()
        mean = float(u.mean())
        return {
            'hidden_units': self.hidden_units,
            'utility_mean': mean,
            'utility_min': float(u.min()),
            'utility_max': float(u.max()),
            'dormant_fraction': float((u <= dormant_fraction_of_mean * mean).float().mean()),
            'mature_units': int((self.age > self.maturity_threshold).sum()),
            'replacements_total': int(self.replacements_total),
            'enabled': self.enabled,
        }
