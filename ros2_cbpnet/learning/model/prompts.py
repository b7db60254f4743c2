"""DualPrompt's prompts: one shared G-prompt and a growing pool of task E-prompts with keys.

A prompt's shape comes from the backbone (:meth:`Backbone.prompt_shape`): prefix-tuning key
and value prefixes for a ViT, a per-channel scale-and-shift for a CNN. The pool grows by one
E-prompt per learned task (no fixed pool size on a robot); a new E-prompt starts as a copy
of the previous one (DualPrompt's prompt transfer) and its key is drawn afresh.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import Backbone, Prompts, init_prompt_

__all__ = ['PromptPool']


class PromptPool(nn.Module):
    """G-prompt, E-prompts and their keys.

    Args:
        backbone: the frozen backbone the prompts are shaped for (not stored).
        g_prompt_length, g_prompt_layers: the shared G-prompt (no layers = no G-prompt).
        e_prompt_length, e_prompt_layers: per-task E-prompts (at least one layer).
        key_dim: size of the query the keys are compared with.
    """

    def __init__(self, backbone: Backbone, *, g_prompt_length: int, g_prompt_layers: Sequence[int],
                 e_prompt_length: int, e_prompt_layers: Sequence[int], key_dim: int) -> None:
        super().__init__()
        self.g_prompt_layers = sorted({int(i) for i in g_prompt_layers})
        self.e_prompt_layers = sorted({int(i) for i in e_prompt_layers})
        if not self.e_prompt_layers:
            raise ValueError('e_prompt_layers must name at least one layer')
        self.first_layer = min(self.g_prompt_layers + self.e_prompt_layers)
        self.key_dim = int(key_dim)
        self.prompt_init = backbone.prompt_init
        self.e_shapes = {i: backbone.prompt_shape(i, e_prompt_length)
                         for i in self.e_prompt_layers}
        self.g_prompt = nn.ParameterDict()
        for i in self.g_prompt_layers:
            p = nn.Parameter(torch.empty(backbone.prompt_shape(i, g_prompt_length)))
            backbone.init_prompt_(p.data)
            self.g_prompt[str(i)] = p
        self.e_prompts = nn.ModuleList()
        self.prompt_keys = nn.ParameterList()
        self._stacked: Optional[Dict[str, torch.Tensor]] = None

    def __len__(self) -> int:
        return len(self.e_prompts)

    def add_task(self, device: torch.device) -> int:
        """Append an E-prompt (a copy of the previous one) and a fresh uniform(-1, 1) key."""
        prompt = nn.ParameterDict()
        for i, shape in self.e_shapes.items():
            if len(self):
                init = self.e_prompts[-1][str(i)].detach().clone()
            else:
                init = torch.empty(shape, device=device)
                init_prompt_(init, self.prompt_init)
            prompt[str(i)] = nn.Parameter(init)
        self.e_prompts.append(prompt)
        key = torch.empty(self.key_dim, device=device)
        nn.init.uniform_(key, -1.0, 1.0)
        self.prompt_keys.append(nn.Parameter(key))
        self.invalidate()
        return len(self) - 1

    def invalidate(self) -> None:
        """Forget the stacked inference copies (after any change)."""
        self._stacked = None

    def task_parameters(self, task_id: int, with_g_prompt: bool) -> List[nn.Parameter]:
        """The parameters one task trains: its E-prompt and key, and optionally the G-prompt."""
        params = list(self.g_prompt.parameters()) if with_g_prompt else []
        return params + list(self.e_prompts[task_id].parameters()) + [self.prompt_keys[task_id]]

    def per_task_size(self) -> int:
        """Trainable numbers per task: G-prompt, one E-prompt and one key."""
        e = sum(int(torch.Size(s).numel()) for s in self.e_shapes.values())
        return sum(p.numel() for p in self.g_prompt.parameters()) + e + self.key_dim

    def prompts_for(self, task_ids: torch.Tensor) -> Prompts:
        """Per-sample prompts: the G-prompt for everyone, each sample's own E-prompt.

        Samples of one batch may select different E-prompts; each keeps its own (indexing
        along the batch axis, never a reshape across it).
        """
        b = task_ids.shape[0]
        prompts: Prompts = {}
        for key, p in self.g_prompt.items():
            prompts.setdefault(int(key), []).append(p.unsqueeze(0).expand(b, *p.shape))
        single = bool((task_ids == task_ids[0]).all()) if b else True
        stacked = None if single else self._stacked_e_prompts()
        for i in self.e_prompt_layers:
            if single:
                p = self.e_prompts[int(task_ids[0]) if b else 0][str(i)]
                prompts.setdefault(i, []).append(p.unsqueeze(0).expand(b, *p.shape))
            else:
                prompts.setdefault(i, []).append(stacked[str(i)][task_ids])
        return prompts

    def _stacked_e_prompts(self) -> Dict[str, torch.Tensor]:
        if self.training:
            return {str(i): torch.stack([e[str(i)] for e in self.e_prompts])
                    for i in self.e_prompt_layers}
        if self._stacked is None:
            with torch.no_grad():
                self._stacked = {str(i): torch.stack([e[str(i)].detach() for e in self.e_prompts])
                                 for i in self.e_prompt_layers}
                self._stacked['keys'] = F.normalize(
                    torch.stack(list(self.prompt_keys)).detach(), dim=1)
        return self._stacked

    @torch.no_grad()
    def key_similarity(self, queries: torch.Tensor) -> torch.Tensor:
        """Cosine similarity (B, tasks) between queries and the task keys."""
        keys = self._stacked_e_prompts()['keys'] if not self.training else F.normalize(
            torch.stack(list(self.prompt_keys)).detach(), dim=1)
        return F.normalize(queries.float(), dim=1) @ keys.float().T

    def pull_constraint(self, queries: torch.Tensor, task_id: int) -> torch.Tensor:
        """Mean cosine similarity between queries and the task's key (maximised)."""
        key = self.prompt_keys[task_id]
        return F.cosine_similarity(queries, key.unsqueeze(0).to(queries.dtype), dim=1).mean()
