"""The frozen feature pass in ONNX Runtime (design.md section 3; no ROS here).

What the default learner computes for every frame and every training image is a fixed
function: the frozen backbone up to the multi-layer pooled query. torch eager is not the
fastest way to run a frozen CNN, so that function is exported once to ONNX (the TorchScript
exporter, opset :data:`OPSET`, a dynamic batch axis) and run in ONNX Runtime, whose
execution providers also reach TensorRT and CUDA on a Jetson. The class statistics, the LDA
and everything trained stay in torch.

The exported file is cached under a *fingerprint* of everything that decides the function:
backbone name, a hash of its weights, input size, query layers, opset and the torch version
that exported it. A cached file is used only when its recorded SHA-256 matches its bytes
and, after loading, it reproduces torch's queries on a fixed probe batch within
:data:`PARITY_RTOL`; anything else (a changed fingerprint, a truncated or corrupt file, a
file that computes something else) is rebuilt, never trusted. Files of other fingerprints
in the cache folder are removed, so it never grows.

:func:`load_onnx_query` returns the runtime, or None and the reason (ONNX Runtime missing,
the export failed, ...) so the learner can fall back to torch and say why.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import time
from collections import OrderedDict
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .choices import RUNTIMES
from .model.backbones import Backbone

__all__ = ['OPSET', 'OnnxQuery', 'PARITY_RTOL', 'PROVIDER_ALIASES', 'RUNTIMES',
           'load_onnx_query', 'query_fingerprint', 'resolve_providers']

_log = logging.getLogger(__name__)

OPSET = 17
#: Largest |onnx - torch| / max|torch| accepted on the probe batch.
PARITY_RTOL = 1e-4
#: Short names accepted in ``onnx_providers``, in the default order of preference.
PROVIDER_ALIASES = {'tensorrt': 'TensorrtExecutionProvider', 'cuda': 'CUDAExecutionProvider',
                    'cpu': 'CPUExecutionProvider'}
_CACHE_PREFIX = 'frozen-query-'
#: Exports made in this process, by fingerprint (the evaluation and the tests create many
#: learners over one backbone); only the last few are kept.
_EXPORTS: 'OrderedDict[str, bytes]' = OrderedDict()
_EXPORTS_KEPT = 4


class _QueryModule(nn.Module):
    """The frozen multi-layer query as a module of its own, for the exporter."""

    def __init__(self, backbone: Backbone, layers: Sequence[int]) -> None:
        super().__init__()
        self.backbone, self.layers = backbone, list(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.query(x, self.layers)


class OnnxQuery:
    """The frozen query of normalised batches, computed by an ONNX Runtime session.

    Attributes:
        provider: the execution provider that runs it (e.g. ``CPUExecutionProvider``).
        fingerprint: what the exported function is (see :func:`query_fingerprint`).
        path: the cached file, or None when the export lives in memory only.
    """

    name = 'onnxruntime'

    def __init__(self, session: Any, fingerprint: str, path: Optional[str]) -> None:
        self._session = session
        self._input = session.get_inputs()[0].name
        self.provider = session.get_providers()[0]
        self.fingerprint, self.path = fingerprint, path

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Queries (B, D) of a normalised float batch (B, 3, S, S), on ``x``'s device."""
        array = x.detach().float().cpu().contiguous().numpy()
        out = self._session.run(None, {self._input: array})[0]
        return torch.from_numpy(out).to(x.device)


def query_fingerprint(backbone: Backbone, image_size: int, layers: Sequence[int]) -> str:
    """SHA-256 over what decides the frozen query: backbone name and weights, input size,
    query layers, opset and the torch version that exports it."""
    digest = hashlib.sha256(json.dumps({
        'backbone': backbone.name, 'image_size': int(image_size),
        'layers': sorted(int(i) for i in layers), 'opset': OPSET,
        'torch': torch.__version__.split('+')[0]}, sort_keys=True).encode())
    for name, tensor in sorted(backbone.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
                      .tobytes())
    return digest.hexdigest()


def resolve_providers(requested: Sequence[str], available: Sequence[str],
                      device: torch.device) -> List[str]:
    """ONNX Runtime providers to ask for, in order.

    ``requested`` names providers (``tensorrt``, ``cuda``, ``cpu`` or ONNX Runtime's own
    names); empty means TensorRT, CUDA, CPU, whichever this ONNX Runtime has, and on a CPU
    device the CPU alone.

    Raises:
        ValueError: a requested provider is unknown or not in this ONNX Runtime.
    """
    if not requested:
        order = list(PROVIDER_ALIASES.values()) if device.type == 'cuda' \
            else [PROVIDER_ALIASES['cpu']]
        return [p for p in order if p in available] or list(available[:1])
    out = []
    for name in requested:
        full = PROVIDER_ALIASES.get(name.lower(), name)
        if full not in available:
            raise ValueError(f'onnx_providers: {name!r} is not available in this ONNX Runtime '
                             f'(it has {", ".join(available)})')
        out.append(full)
    return out


def _export(backbone: Backbone, layers: Sequence[int], image_size: int) -> bytes:
    module = _QueryModule(backbone, layers).eval()
    buffer = io.BytesIO()
    probe = torch.zeros(2, 3, image_size, image_size)
    was = next(backbone.parameters()).device
    backbone.to('cpu')
    try:
        with torch.no_grad():
            # The TorchScript exporter needs only torch (the dynamo one needs onnxscript).
            torch.onnx.export(module, (probe,), buffer, input_names=['image'],
                              output_names=['query'], opset_version=OPSET, dynamo=False,
                              dynamic_axes={'image': {0: 'batch'}, 'query': {0: 'batch'}})
    finally:
        backbone.to(was)
    return buffer.getvalue()


def _probe(image_size: int) -> torch.Tensor:
    return torch.randn(2, 3, image_size, image_size,
                       generator=torch.Generator().manual_seed(1234))


def _parity(runtime: OnnxQuery, backbone: Backbone, layers: Sequence[int],
            image_size: int) -> float:
    """Largest relative difference between ONNX Runtime's and torch's queries on the probe."""
    x = _probe(image_size)
    device = next(backbone.parameters()).device
    with torch.inference_mode():
        ref = backbone.query(x.to(device), list(layers)).float().cpu()
    out = runtime(x)
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def _session(data: bytes, providers: List[str], threads: int, cache_dir: Optional[str]) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(0, int(threads))
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle worker threads spin by default; on a robot's few cores that steals the camera
    # thread's time between frames.
    options.add_session_config_entry('session.intra_op.allow_spinning', '0')
    options.log_severity_level = 3
    with_options: List[Any] = []
    for p in providers:
        if p == 'TensorrtExecutionProvider' and cache_dir:
            with_options.append((p, {'trt_engine_cache_enable': True,
                                     'trt_engine_cache_path': cache_dir}))
        else:
            with_options.append(p)
    return ort.InferenceSession(data, options, providers=with_options)


def _read_cache(path: str, fingerprint: str) -> Optional[bytes]:
    """The cached export, when its sidecar names this fingerprint and its bytes' hash."""
    try:
        with open(path + '.json', encoding='utf-8') as fh:
            meta = json.load(fh)
        with open(path, 'rb') as fh:
            data = fh.read()
    except (OSError, ValueError):
        return None
    if meta.get('fingerprint') != fingerprint or \
            meta.get('sha256') != hashlib.sha256(data).hexdigest():
        _log.warning('cached ONNX export %s does not match its record; rebuilding it', path)
        return None
    return data


def _write_cache(directory: str, path: str, data: bytes, fingerprint: str) -> None:
    """Write the export and its sidecar atomically; drop exports of other fingerprints."""
    os.makedirs(directory, exist_ok=True)
    meta = {'fingerprint': fingerprint, 'sha256': hashlib.sha256(data).hexdigest(),
            'torch': torch.__version__, 'opset': OPSET, 'created': time.time()}
    for target, payload in ((path, data), (path + '.json', json.dumps(meta).encode())):
        fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp-')
        with os.fdopen(fd, 'wb') as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    for name in os.listdir(directory):
        if name.startswith(_CACHE_PREFIX) and not os.path.join(directory, name).startswith(path):
            try:
                os.remove(os.path.join(directory, name))
            except OSError:
                pass


def load_onnx_query(backbone: Backbone, layers: Sequence[int], image_size: int, *,
                    providers: Sequence[str] = (), threads: int = 0,
                    cache_dir: Optional[str] = None
                    ) -> Tuple[Optional[OnnxQuery], str]:
    """The frozen query in ONNX Runtime, from the cache or a fresh export.

    Args:
        backbone: the loaded frozen backbone (its device decides the default providers).
        layers: the query layers; image_size: the square input side.
        providers: ``onnx_providers`` (see :func:`resolve_providers`).
        threads: ONNX Runtime intra-op threads (0 = its default, one per core).
        cache_dir: where exports are cached (created); None keeps the export in memory.

    Returns:
        ``(runtime, 'ok')``, or ``(None, reason)`` when ONNX Runtime cannot be used here.

    Raises:
        ValueError: a requested provider does not exist (a configuration error, not a
            reason to fall back).
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return None, f'onnxruntime is not installed ({exc})'
    device = next(backbone.parameters()).device
    chosen = resolve_providers(providers, ort.get_available_providers(), device)
    fingerprint = query_fingerprint(backbone, image_size, layers)
    path = os.path.join(cache_dir, f'{_CACHE_PREFIX}{fingerprint[:16]}.onnx') \
        if cache_dir else None
    disk = _read_cache(path, fingerprint) if path else None
    for source, data in (('cache', disk), ('memory', _EXPORTS.get(fingerprint)),
                         ('export', None)):
        if source != 'export' and data is None:
            continue
        if data is None:
            started = time.monotonic()
            try:
                data = _export(backbone, layers, image_size)
            except Exception as exc:  # noqa: BLE001 - any exporter failure means "use torch"
                return None, f'the ONNX export failed: {type(exc).__name__}: {exc}'
            _log.info('exported the frozen query to ONNX in %.1f s',
                      time.monotonic() - started)
        try:
            runtime = OnnxQuery(_session(data, chosen, threads, cache_dir), fingerprint,
                                path)
            error = _parity(runtime, backbone, layers, image_size)
        except Exception as exc:  # noqa: BLE001 - a file ONNX Runtime cannot load is rebuilt
            _log.warning('ONNX Runtime could not run the %s export: %s', source, exc)
            continue
        if error > PARITY_RTOL:
            _log.warning('the %s ONNX export differs from torch by %.1e (relative); not used',
                         source, error)
            continue
        _EXPORTS[fingerprint] = data
        _EXPORTS.move_to_end(fingerprint)
        while len(_EXPORTS) > _EXPORTS_KEPT:
            _EXPORTS.popitem(last=False)
        if path and source != 'cache':
            try:
                _write_cache(cache_dir, path, data, fingerprint)
            except OSError as exc:
                _log.warning('could not cache the ONNX export in %s: %s', cache_dir, exc)
                runtime.path = None
        return runtime, 'ok'
    return None, 'the ONNX export does not reproduce the torch queries'
