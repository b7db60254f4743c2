"""The classifier head: one linear layer over all classes seen so far, grown as they arrive."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ['ClassifierHead']


class ClassifierHead(nn.Module):
    """Linear logits over the prompted (and CBP-block) feature; rows are added per class.

    New rows start small (normal, std 0.01) so a new task's classes begin near chance.
    """

    def __init__(self, feature_dim: int) -> None:
        super().__init__()
        self.feature_dim = int(feature_dim)
        self.weight = nn.Parameter(torch.zeros(0, feature_dim))
        self.bias = nn.Parameter(torch.zeros(0))

    @property
    def num_classes(self) -> int:
        """Number of rows."""
        return int(self.weight.shape[0])

    def grow(self, count: int) -> None:
        """Append ``count`` freshly initialised rows."""
        device = self.weight.device
        new_w = torch.empty(count, self.feature_dim, device=device)
        nn.init.normal_(new_w, std=0.01)
        self.weight = nn.Parameter(torch.cat([self.weight.detach(), new_w]))
        self.bias = nn.Parameter(torch.cat([self.bias.detach(),
                                            torch.zeros(count, device=device)]))

    def forward(self, z: torch.Tensor, class_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits over all classes, or only over ``class_ids``."""
        w, b = self.weight, self.bias
        if class_ids is not None:
            w, b = w[class_ids], b[class_ids]
        return z @ w.T.to(z.dtype) + b.to(z.dtype)
