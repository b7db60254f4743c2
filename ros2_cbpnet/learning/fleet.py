"""What robots of a fleet share, in a safe format (no ROS here; the node's side is
:mod:`ros2_cbpnet.ros.fleet_link`).

The default learner keeps *sufficient statistics* of a frozen feature: per class a count and
a mean, one within-class scatter shared by all classes, and the sums that calibrate novelty.
Statistics add up exactly (Chan et al.'s pairwise update), so the model a robot builds from
its own images plus every other robot's contributions is the model one robot would have
learned from all the images, in any order. A :class:`Contribution` is one robot's change:

- ``kind='task'``: the statistics of the images of one ``learn_task`` (its new and refined
  classes): counts, means, the scatter of the images about their class means, and the
  novelty calibration sums;
- ``kind='withdraw'``: the same statistics again, to be subtracted (the robot undid that
  task; ``withdraws`` names its sequence number);
- ``kind='forget'``: a class the robot forgot (``forget``).

Every contribution carries the robot id, a per-robot sequence number, and the *feature
fingerprint* (backbone name, a hash of its weights, input size, query layers): statistics of
another feature are meaningless here and are refused.

**The scatter, compactly and exactly.** A task of N images in D dimensions has a scatter of
rank at most N - C. When N < D the contribution carries a factor F (r x D, r <= N) with
F^T F = S: the centred rows rotated by the eigenvectors of their Gram matrix, so a single
image's feature cannot be read off it (only what the scatter itself says). Otherwise it
carries the upper triangle of S. Arrays are float32, as the learner keeps them.

**The wire format** (:func:`encode` / :func:`decode`): ``b'CBPF'``, a format version byte,
a big-endian uint32 header length, a UTF-8 JSON header (fields, and for each array its name,
dtype, shape and byte offset), then the raw little-endian arrays; the header holds the
SHA-256 of the header and the arrays. Nothing is ever unpickled. :func:`decode` refuses, with a
reason from :data:`REFUSALS`, anything oversized, truncated, unparsable, of an unknown
version, with a wrong checksum, or inconsistent (negative or zero counts, wrong shapes,
non-finite numbers, a scatter that is not positive semi-definite on its diagonal).
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ['Contribution', 'FleetLedger', 'FleetRefused', 'FORMAT_VERSION', 'KINDS', 'MAGIC',
           'MAX_BYTES', 'REFUSALS', 'check', 'compact_scatter', 'decode', 'encode',
           'feature_fingerprint', 'scatter_matrix']

MAGIC = b'CBPF'
FORMAT_VERSION = 1
KINDS = ('task', 'withdraw', 'forget')
#: Largest contribution accepted by default (a full 1,984^2 scatter is 7.9 MB packed).
MAX_BYTES = 64 * 2 ** 20
#: Reasons a contribution is refused (the node counts each).
REFUSALS = ('malformed', 'oversized', 'version', 'checksum', 'inconsistent', 'fingerprint',
            'peer')
_HEADER_LIMIT = 2 ** 20
_NO_SUM = '0' * 64
_DTYPES = {'float32': np.float32, 'int64': np.int64}


class FleetRefused(ValueError):
    """A contribution that must not change the model; ``reason`` is one of :data:`REFUSALS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f'{reason}: {detail}')
        self.reason, self.detail = reason, detail


@dataclass
class Contribution:
    """One robot's change of its class statistics (see the module docstring).

    ``scatter_form`` is ``'factor'`` (``scatter`` is r x D, F^T F = S), ``'packed'`` (the
    upper triangle of S, row by row) or ``'none'`` (forget). ``novelty`` is the calibration
    sums (sum, sum of squares, count) of the task's images.
    """

    kind: str
    robot_id: str
    sequence: int
    fingerprint: str
    classes: List[str] = field(default_factory=list)
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    means: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    scatter_form: str = 'none'
    scatter: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    novelty: Tuple[float, float, int] = (0.0, 0.0, 0)
    withdraws: Optional[int] = None
    forget: Optional[str] = None
    created: float = 0.0

    @property
    def tag(self) -> Tuple[str, int]:
        """(robot id, sequence): what makes a contribution unique."""
        return self.robot_id, int(self.sequence)

    @property
    def dim(self) -> int:
        """Feature size of the statistics (0 for a forget)."""
        return int(self.means.shape[1]) if self.means.ndim == 2 else 0

    def as_withdraw(self, sequence: int) -> 'Contribution':
        """The contribution that takes this task's statistics back out, as ``sequence``."""
        out = Contribution(**{k: getattr(self, k) for k in self.__dataclass_fields__})
        out.kind, out.sequence, out.withdraws = 'withdraw', int(sequence), int(self.sequence)
        return out


def feature_fingerprint(backbone: Any, image_size: int, layers: Sequence[int]) -> str:
    """SHA-256 over what decides the frozen feature: backbone name and weights, input size and
    query layers (not the software versions: two robots with other torch builds compute the
    same feature)."""
    digest = hashlib.sha256(json.dumps({
        'backbone': backbone.name, 'image_size': int(image_size),
        'layers': sorted(int(i) for i in layers)}, sort_keys=True).encode())
    for name, tensor in sorted(backbone.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
                      .tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------ scatter
def compact_scatter(rows: np.ndarray) -> Tuple[str, np.ndarray]:
    """The exact compact form of the scatter R^T R of ``rows`` (N x D, already centred on
    their class means): a factor when N < D, else the packed upper triangle."""
    rows = np.asarray(rows, dtype=np.float64)
    n, d = rows.shape
    if n >= d:
        scatter = rows.T @ rows
        return 'packed', scatter[np.triu_indices(d)].astype(np.float32)
    gram = rows @ rows.T
    eigenvalues, vectors = np.linalg.eigh(gram)
    keep = eigenvalues > eigenvalues.max(initial=0.0) * 1e-12
    # U^T R: rows of the factor are orthogonal combinations of the images, no single one.
    return 'factor', (vectors[:, keep].T @ rows).astype(np.float32)


def scatter_matrix(c: Contribution) -> np.ndarray:
    """The D x D scatter of a contribution, float64."""
    d = c.dim
    if c.scatter_form == 'factor':
        f = c.scatter.astype(np.float64)
        return f.T @ f
    if c.scatter_form == 'packed':
        full = np.zeros((d, d))
        full[np.triu_indices(d)] = c.scatter
        return full + np.triu(full, 1).T
    return np.zeros((d, d))


# ------------------------------------------------------------------------------ codec
def encode(c: Contribution) -> bytes:
    """The wire bytes of a contribution."""
    arrays = {'counts': np.ascontiguousarray(c.counts, dtype=np.int64),
              'means': np.ascontiguousarray(c.means, dtype=np.float32),
              'scatter': np.ascontiguousarray(c.scatter, dtype=np.float32)}
    table, blobs, offset = [], [], 0
    for name, array in arrays.items():
        data = array.astype(array.dtype.newbyteorder('<'), copy=False).tobytes()
        table.append({'name': name, 'dtype': array.dtype.name, 'shape': list(array.shape),
                      'offset': offset, 'nbytes': len(data)})
        blobs.append(data)
        offset += len(data)
    body = b''.join(blobs)
    header = {
        'format': 'cbpnet-fleet', 'kind': c.kind, 'robot_id': c.robot_id,
        'sequence': int(c.sequence), 'fingerprint': c.fingerprint, 'classes': list(c.classes),
        'scatter_form': c.scatter_form,
        'novelty': [float(c.novelty[0]), float(c.novelty[1]), int(c.novelty[2])],
        'withdraws': c.withdraws, 'forget': c.forget, 'created': float(c.created),
        'arrays': table, 'sha256': _NO_SUM}
    head = json.dumps(header, ensure_ascii=False).encode('utf-8')
    # The checksum covers the header (with its own field blank) and the arrays.
    digest = hashlib.sha256(head + body).hexdigest().encode('ascii')
    head = head.replace(_NO_SUM.encode('ascii'), digest, 1)
    return MAGIC + bytes([FORMAT_VERSION]) + struct.pack('>I', len(head)) + head + body


def decode(data: bytes, max_bytes: int = MAX_BYTES) -> Contribution:
    """Parse and check wire bytes.

    Raises:
        FleetRefused: with one of :data:`REFUSALS` (not ``fingerprint``/``peer``, which
            depend on the receiver).
    """
    if len(data) > max_bytes:
        raise FleetRefused('oversized', f'{len(data)} bytes, the limit is {max_bytes}')
    if len(data) < 9 or data[:4] != MAGIC:
        raise FleetRefused('malformed', 'not a cbpnet fleet contribution')
    if data[4] != FORMAT_VERSION:
        raise FleetRefused('version', f'format version {data[4]}, this node reads '
                                      f'{FORMAT_VERSION}')
    (length,) = struct.unpack('>I', data[5:9])
    if length > min(_HEADER_LIMIT, len(data) - 9):
        raise FleetRefused('malformed', 'truncated header')
    try:
        header = json.loads(data[9:9 + length].decode('utf-8'))
        if not isinstance(header, dict):
            raise ValueError('the header is not an object')
    except (UnicodeDecodeError, ValueError) as exc:
        raise FleetRefused('malformed', f'unreadable header: {exc}') from None
    body = data[9 + length:]
    digest = header.get('sha256')
    raw = data[9:9 + length]
    if not isinstance(digest, str) or len(digest) != 64 or \
            hashlib.sha256(raw.replace(digest.encode('ascii', 'replace'), _NO_SUM.encode(
                'ascii'), 1) + body).hexdigest() != digest:
        raise FleetRefused('checksum', 'the contribution does not match its checksum')
    try:
        arrays = _arrays(header.get('arrays'), body)
        c = Contribution(
            kind=_text(header, 'kind'), robot_id=_text(header, 'robot_id'),
            sequence=_int(header, 'sequence'), fingerprint=_text(header, 'fingerprint'),
            classes=[str(x) for x in _list(header, 'classes')],
            counts=arrays['counts'], means=arrays['means'],
            scatter_form=_text(header, 'scatter_form'), scatter=arrays['scatter'],
            novelty=_novelty(header.get('novelty')),
            withdraws=header.get('withdraws'), forget=header.get('forget'),
            created=float(header.get('created', 0.0)))
    except (KeyError, TypeError, ValueError) as exc:
        raise FleetRefused('malformed', f'bad field: {exc}') from None
    check(c)
    return c


def check(c: Contribution) -> None:
    """Refuse an inconsistent contribution (``FleetRefused('inconsistent', ...)``)."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise FleetRefused('inconsistent', what)
    need(c.kind in KINDS, f'unknown kind {c.kind!r}')
    need(bool(c.robot_id.strip()) and len(c.robot_id) <= 256, 'bad robot id')
    need(0 <= c.sequence < 2 ** 62, 'bad sequence number')
    need(len(c.fingerprint) == 64, 'bad fingerprint')
    if c.kind == 'forget':
        need(isinstance(c.forget, str) and 0 < len(c.forget.strip()) <= 128, 'bad class name')
        return
    if c.kind == 'withdraw':
        need(isinstance(c.withdraws, int) and not isinstance(c.withdraws, bool)
             and 0 <= c.withdraws < c.sequence,
             'a withdraw must name an earlier sequence number')
    k = len(c.classes)
    need(k > 0 and len(set(c.classes)) == k, 'classes must be distinct and not empty')
    need(all(0 < len(x.strip()) <= 128 for x in c.classes), 'bad class name')
    need(c.counts.shape == (k,) and bool((c.counts > 0).all()),
         'counts must be positive, one per class')
    need(c.means.ndim == 2 and c.means.shape[0] == k and c.means.shape[1] > 0,
         'means must be one row per class')
    d = c.dim
    if c.scatter_form == 'factor':
        need(c.scatter.ndim == 2 and c.scatter.shape[1] == d
             and c.scatter.shape[0] <= int(c.counts.sum()), 'bad scatter factor shape')
    elif c.scatter_form == 'packed':
        need(c.scatter.shape == (d * (d + 1) // 2,), 'bad packed scatter size')
        need(bool((c.scatter[_diagonal_index(d)] >= 0).all()), 'negative scatter diagonal')
    else:
        raise FleetRefused('inconsistent', f'unknown scatter form {c.scatter_form!r}')
    need(bool(np.isfinite(c.means).all()) and bool(np.isfinite(c.scatter).all()),
         'non-finite numbers')
    total, squares, count = c.novelty
    need(math.isfinite(total) and math.isfinite(squares) and squares >= 0
         and 0 <= count <= int(c.counts.sum()), 'bad novelty calibration sums')


def _diagonal_index(d: int) -> np.ndarray:
    # Row i of the packed upper triangle starts at i*d - i*(i-1)/2; its first entry is (i, i).
    i = np.arange(d)
    return i * d - i * (i - 1) // 2


def _arrays(table: Any, body: bytes) -> Dict[str, np.ndarray]:
    if not isinstance(table, list):
        raise ValueError('no array table')
    out: Dict[str, np.ndarray] = {}
    for entry in table:
        name, dtype = str(entry['name']), _DTYPES[str(entry['dtype'])]
        shape = tuple(int(s) for s in entry['shape'])
        offset, nbytes = int(entry['offset']), int(entry['nbytes'])
        if name in out or any(s < 0 for s in shape) or offset < 0 or len(shape) > 2:
            raise ValueError(f'bad array entry {name!r}')
        if nbytes != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize \
                or offset + nbytes > len(body):
            raise ValueError(f'array {name!r} does not fit the data')
        out[name] = np.frombuffer(body, dtype=np.dtype(dtype).newbyteorder('<'),
                                  count=int(np.prod(shape, dtype=np.int64)),
                                  offset=offset).reshape(shape).astype(dtype)
    for name in ('counts', 'means', 'scatter'):
        if name not in out:
            raise ValueError(f'array {name!r} missing')
    return out


def _text(header: Dict[str, Any], key: str) -> str:
    value = header[key]
    if not isinstance(value, str):
        raise TypeError(f'{key} must be a string')
    return value


def _int(header: Dict[str, Any], key: str) -> int:
    value = header[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f'{key} must be an integer')
    return value


def _list(header: Dict[str, Any], key: str) -> List[Any]:
    value = header[key]
    if not isinstance(value, list):
        raise TypeError(f'{key} must be a list')
    return value


def _novelty(value: Any) -> Tuple[float, float, int]:
    if not isinstance(value, list) or len(value) != 3:
        raise TypeError('novelty must be [sum, sum of squares, count]')
    return float(value[0]), float(value[1]), int(value[2])


# ------------------------------------------------------------------------------ ledger
@dataclass(frozen=True)
class FleetLedger:
    """What of the fleet a model holds; part of each model snapshot, so undo restores it.

    ``exported``: this robot's own contributions (sequence numbers) in the model;
    ``applied``: the (robot id, sequence) of the imported ones; ``origins``: for each class,
    the robots whose images it was learned from.
    """

    exported: Tuple[int, ...] = ()
    applied: Tuple[Tuple[str, int], ...] = ()
    origins: Tuple[Tuple[str, Tuple[str, ...]], ...] = ()

    def origin_map(self) -> Dict[str, List[str]]:
        """``{class: [robot ids]}``."""
        return {name: list(robots) for name, robots in self.origins}

    def with_origin(self, classes: Sequence[str], robot: str, add: bool = True
                    ) -> 'FleetLedger':
        """A copy with ``robot`` added to (or removed from) the origins of ``classes``."""
        origins = self.origin_map()
        for name in classes:
            robots = [r for r in origins.get(name, []) if r != robot]
            if add:
                robots.append(robot)
            origins[name] = robots
        return FleetLedger(self.exported, self.applied, tuple(
            (name, tuple(robots)) for name, robots in origins.items() if robots))

    def to_json(self) -> Dict[str, Any]:
        """Plain data for checkpoints."""
        return {'exported': list(self.exported), 'applied': [list(t) for t in self.applied],
                'origins': self.origin_map()}

    @staticmethod
    def from_json(data: Optional[Dict[str, Any]]) -> 'FleetLedger':
        """The ledger of a checkpoint (an empty one for checkpoints from before the fleet)."""
        if not data:
            return FleetLedger()
        return FleetLedger(tuple(int(s) for s in data.get('exported', [])),
                           tuple((str(r), int(s)) for r, s in data.get('applied', [])),
                           tuple((str(k), tuple(str(r) for r in v))
                                 for k, v in data.get('origins', {}).items()))
