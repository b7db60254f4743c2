"""Crash-safe checkpoint files: atomic writes, the previous file kept, weights-only loading.

Files are named ``cbpnet-<model_version:06d>.pt`` inside one directory. A write goes to a
hidden temporary file in the same directory, is fsynced, renamed over the final name and the
directory is fsynced, so a kill at any moment leaves either the old set of files or the new
one, never a half-written file under a checkpoint name. Loading uses
``torch.load(weights_only=True)``: a checkpoint can hold tensors, numbers, strings, lists and
dicts, and never executes code. No label or other user input ever becomes part of a path.
"""
from __future__ import annotations

import io
import logging
import os
import re
from typing import Any, Dict, List, Optional, Tuple

import torch

__all__ = [
    'CheckpointError', 'IncompatibleCheckpointError', 'SCHEMA_VERSION', 'checkpoint_version',
    'list_checkpoints', 'upgrade_architecture', 'upgrade_state_dict',
    'load_newest_valid', 'read_checkpoint', 'write_checkpoint',
]

SCHEMA_VERSION = 1
FORMAT = 'ros2_cbpnet'
KEEP = 2
_NAME = re.compile(r'^cbpnet-(\d{6,})\.pt$')
_REQUIRED = ('schema_version', 'format', 'backbone', 'model_version', 'classes', 'tasks',
             'architecture', 'state_dict')
_log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable, incomplete or made for another backbone or schema."""


class IncompatibleCheckpointError(CheckpointError):
    """A valid checkpoint that belongs to another backbone or schema (never overwritten)."""


def list_checkpoints(directory: str) -> List[str]:
    """Checkpoint paths in ``directory``, newest (highest model version) first."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        match = _NAME.match(name)
        if match:
            found.append((int(match.group(1)), os.path.join(directory, name)))
    return [path for _, path in sorted(found, reverse=True)]


def checkpoint_version(path: str) -> int:
    """Model version in a checkpoint file name (-1 when the name is not a checkpoint's)."""
    match = _NAME.match(os.path.basename(path))
    return int(match.group(1)) if match else -1


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_checkpoint(payload: Dict[str, Any], directory: str) -> str:
    """Atomically write ``payload`` as the checkpoint of its ``model_version``.

    Keeps the newest :data:`KEEP` checkpoints and removes older ones and stale temporary
    files. Refuses to overwrite a valid checkpoint that belongs to another backbone.

    Returns:
        The path written.

    Raises:
        CheckpointError: the directory cannot be created or written.
    """
    version = int(payload['model_version'])
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f'cannot create checkpoint_dir {directory!r}: {exc}') from exc
    final = os.path.join(directory, f'cbpnet-{version:06d}.pt')
    if os.path.exists(final):
        try:
            _check_compatible(read_checkpoint(final), payload['backbone'])
        except IncompatibleCheckpointError:
            raise
        except CheckpointError:
            pass  # a corrupt file under our name may be replaced
    tmp = os.path.join(directory, f'.cbpnet-{version:06d}.pt.tmp-{os.getpid()}')
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    try:
        with open(tmp, 'wb') as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(directory)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise CheckpointError(f'cannot write checkpoint {final!r}: {exc}') from exc
    _prune(directory, keep_path=final)
    return final


def _prune(directory: str, keep_path: str) -> None:
    paths = list_checkpoints(directory)
    # Count only checkpoints up to the one just written towards KEEP. A file with a higher
    # version was not written by this model (an unreadable, refused or foreign file the
    # loader skipped); it must neither be deleted nor take the slot of the previous valid
    # checkpoint, which would leave a single good file behind.
    written = checkpoint_version(keep_path)
    ours = [path for path in paths if checkpoint_version(path) <= written]
    newer = {path for path in paths if checkpoint_version(path) > written}
    keep = set(ours[:KEEP]) | {keep_path} | newer
    for path in paths:
        if path not in keep:
            try:
                os.unlink(path)
            except OSError as exc:
                _log.warning('could not remove old checkpoint %s: %s', path, exc)
    for name in os.listdir(directory):
        # Temporary files of writers that were killed; never loaded, safe to remove.
        if name.startswith('.cbpnet-') and '.tmp-' in name:
            try:
                os.unlink(os.path.join(directory, name))
            except OSError:
                pass


def read_checkpoint(path: str) -> Dict[str, Any]:
    """Load and structurally validate one checkpoint file (weights only, no code runs).

    Raises:
        CheckpointError: unreadable, truncated, not a dict, or missing fields.
    """
    try:
        payload = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncation, pickle refusal, zip errors all land here
        raise CheckpointError(f'checkpoint {path!r} is unreadable or not a weights-only file '
                              f'({type(exc).__name__}: {str(exc).splitlines()[0][:200]})'
                              ) from exc
    if not isinstance(payload, dict) or payload.get('format') != FORMAT:
        raise CheckpointError(f'{path!r} is not a ros2_cbpnet checkpoint')
    missing = [k for k in _REQUIRED if k not in payload]
    if missing:
        raise CheckpointError(f'checkpoint {path!r} lacks {missing}')
    return payload


def _check_compatible(payload: Dict[str, Any], backbone: str) -> None:
    if payload['schema_version'] != SCHEMA_VERSION:
        raise IncompatibleCheckpointError(
            f'checkpoint schema {payload["schema_version"]} is not supported by this version '
            f'(schema {SCHEMA_VERSION}); use a matching ros2_cbpnet or another checkpoint_dir')
    if payload['backbone'] != backbone:
        raise IncompatibleCheckpointError(
            f'checkpoint was made for backbone {payload["backbone"]!r}, not {backbone!r}: set '
            f'backbone:={payload["backbone"]} or choose another checkpoint_dir')


def load_newest_valid(directory: str, backbone: str
                      ) -> Tuple[Optional[Dict[str, Any]], Optional[str], List[str]]:
    """The newest readable checkpoint in ``directory``, falling back to older ones.

    Returns:
        ``(payload, path, problems)``: payload and path are None when there is no valid
        checkpoint; ``problems`` lists what was wrong with newer files that were skipped.

    Raises:
        IncompatibleCheckpointError: the newest readable checkpoint belongs to another
            backbone or schema (refused rather than silently replaced).
    """
    problems: List[str] = []
    for path in list_checkpoints(directory):
        try:
            payload = read_checkpoint(path)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        _check_compatible(payload, backbone)
        return payload, path, problems
    return None, None, problems


# --------------------------------------------------------- older layouts (same schema)
#: State-dict keys of checkpoints written before the model was split into parts.
OLD_KEYS = {'g_prompt.': 'prompts.g_prompt.', 'e_prompts.': 'prompts.e_prompts.',
            'prompt_keys.': 'prompts.prompt_keys.', 'head_weight': 'head.weight',
            'head_bias': 'head.bias', 'class_count': 'stats.class_count',
            'query_mean': 'stats.query_mean', 'query_scatter': 'stats.query_scatter',
            'feature_mean': 'stats.feature_mean', 'feature_var': 'stats.feature_var'}


def upgrade_architecture(arch: Dict[str, Any], num_layers: int) -> Dict[str, Any]:
    """The architecture of a payload, completed for checkpoints written before
    multi-layer queries (they used the pre-logits feature alone: the last of ``num_layers``)."""
    if 'query_layers' not in arch:
        arch = dict(arch, query_layers=[num_layers - 1])
    return arch


def upgrade_state_dict(weights: Dict[str, torch.Tensor], arch: Dict[str, Any]
                       ) -> Dict[str, torch.Tensor]:
    """Rename the keys of older checkpoints; fill what they did not have yet."""
    out: Dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        for old, new in OLD_KEYS.items():
            if key == old or (old.endswith('.') and key.startswith(old)):
                key = new + key[len(old):]
                break
        out[key] = value
    # Before forgetting existed every class was active; before 'stats' prediction every
    # task was trained.
    out.setdefault('class_active', torch.ones(len(arch['class_task']), dtype=torch.bool))
    out.setdefault('task_trained', torch.ones(int(arch['num_tasks']), dtype=torch.bool))
    # Before novelty was calibrated: uncalibrated until the next task is learned.
    for name, dtype in (('novelty_sum', torch.float64), ('novelty_sum_sq', torch.float64),
                        ('novelty_count', torch.long)):
        out.setdefault(f'stats.{name}', torch.zeros((), dtype=dtype))
    return out
