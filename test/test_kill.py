"""Crash safety of ``cbpnet_node`` as a real process: SIGKILL during learn_task and ~/save,
corrupt, foreign and malicious checkpoints.

Each node start gets its own namespace and camera topic, so the DDS discovery data that a
killed participant leaves behind for a while can never answer for the next node. Expected
predictions come from a :class:`ContinualLearner` in this process that loads the same
checkpoint file (an oracle independent of the node). The kill moments come from a seeded
generator: seed 0 by default (so a failure repeats), another with ``CBPNET_KILL_SEED=N``; the
seed is printed. A kill during ``~/save`` is aimed at a write in progress (its temporary file
exists) and the test asserts that it landed inside one.
"""
import hashlib
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from std_srvs.srv import Trigger

from ros2_cbpnet.learning import checkpoint as ckpt
from ros2_cbpnet.learning.learner import ContinualLearner, LearnerConfig
from ros2_cbpnet.ros.node_core import RUNTIME_CACHE_DIR
from ros_helpers import (LATCHED, client_in_process, noisy_images, node_process, read_log,
                         ros_env, write_params_file)

# Each test starts one to four node processes (backbone loading, learning) on 2 shared cores.
pytestmark = [pytest.mark.ros, pytest.mark.slow, pytest.mark.timeout(600)]

RED, BLUE, GREEN, YELLOW = (200, 40, 40), (40, 40, 200), (40, 190, 40), (210, 200, 40)
PURPLE, CYAN = (150, 40, 180), (40, 190, 190)
#: Seeds the kill moments; the default is fixed so a failure repeats. Set CBPNET_KILL_SEED to
#: try other moments (e.g. a loop over seeds by hand).
SEED = int(os.environ.get('CBPNET_KILL_SEED', '0'))
_starts = iter(range(1, 1000))


def _params(tmp_path, checkpoint_dir, camera, **changes):
    params = dict(prediction='task', min_steps=0,  # the learned recipe
                  image_size=64, epochs=3, batch_size=4, learning_rate=0.01,
                  min_samples_per_class=3, diagnostics_period_s=0.3, image_qos='reliable',
                  image_topics=[camera], checkpoint_dir=str(checkpoint_dir))
    params.update(changes)
    return write_params_file(tmp_path / f'params-{camera.strip("/").replace("/", "_")}.yaml',
                             params)


class Started:
    """One node process in a namespace of its own, with a client (a context manager)."""

    def __init__(self, tmp_path, checkpoint_dir, **changes):
        self.ns = f'kill{os.getpid()}_{next(_starts)}'
        self.camera = f'/{self.ns}/cam/image_raw'
        self._proc_cm = node_process(_params(tmp_path, checkpoint_dir, self.camera, **changes),
                                     ros_args=['-r', f'__ns:=/{self.ns}'],
                                     log_path=tmp_path / f'{self.ns}.log')
        self._client_cm = client_in_process(f'/{self.ns}/cbpnet')

    def __enter__(self):
        self.proc = self._proc_cm.__enter__()
        self.client = self._client_cm.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            self._client_cm.__exit__(*exc)
        finally:
            self._proc_cm.__exit__(*exc)

    def ready(self, timeout=180.0):
        """Wait until the node answers a service (the backbone is loaded)."""
        reply = self.client.call_trigger('~/clear_buffer', timeout=timeout)
        assert reply.success, read_log(self.proc)

    def labels(self):
        message = self.client.collect('~/labels', qos=LATCHED).wait_for(timeout=180)
        assert message is not None, read_log(self.proc)
        return message

    def teach(self, classes, per_class=8, seed=0):
        rng = np.random.default_rng(seed)
        for label, colour in classes.items():
            self.client.publish_images('~/labelled_images',
                                       noisy_images(colour, per_class, rng=rng), label)
        total = per_class * len(classes)
        found = self.client.wait_for_status(
            'cbpnet: learner', lambda level, v: int(v['buffer_samples']) == total, 60)
        assert found is not None, read_log(self.proc)

    def predict(self, frames):
        predictions = self.client.collect('~/predictions')
        try:
            return {name: self.client.classify(self.camera, rgb, f'{self.ns}_{name}',
                                               predictions, timeout=90)
                    for name, rgb in frames.items()}
        finally:
            predictions.close()


def _frames():
    rng = np.random.default_rng(1234)
    return {'red': noisy_images(RED, 1, rng=rng)[0], 'blue': noisy_images(BLUE, 1, rng=rng)[0],
            'mix': noisy_images((120, 40, 120), 1, rng=rng)[0]}


def _same_predictions(got, want, atol=1e-3):
    for name, pred in want.items():
        g = got[name]
        label = pred['label'] if isinstance(pred, dict) else pred.label
        score = pred['score'] if isinstance(pred, dict) else pred.score
        assert g['label'] == label, (name, g, pred)
        assert abs(g['score'] - score) < atol, (name, g, pred)


def _digest(directory):
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(Path(directory).iterdir()) if p.is_file()}


def _checkpoint_files(directory):
    # The ONNX export cache has its own sub-folder; only files are checkpoints.
    return sorted(p.name for p in Path(directory).iterdir()
                  if not p.name.startswith('.') and p.name != RUNTIME_CACHE_DIR)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    """Two checkpoints made without ROS: v1 = {blue, red}, v2 = v1 + {green, yellow}, and
    what a learner that loads each predicts for the fixed frames."""
    directory = tmp_path_factory.mktemp('reference')
    learner = ContinualLearner(LearnerConfig(image_size=64, epochs=3, batch_size=4, seed=0))
    rng = np.random.default_rng(0)
    paths = {}
    for version, classes in ((1, {'red': RED, 'blue': BLUE}),
                             (2, {'green': GREEN, 'yellow': YELLOW})):
        images, labels = [], []
        for label, colour in classes.items():
            images += noisy_images(colour, 8, rng=rng)
            labels += [label] * 8
        learner.learn_task(images, labels)
        paths[version] = learner.save_checkpoint(str(directory / f'v{version}'))
    frames = _frames()
    oracle = {}
    for version, path in paths.items():
        learner.load_checkpoint_payload(ckpt.read_checkpoint(path))
        oracle[version] = dict(zip(frames, learner.predict(list(frames.values()))))
    return {'paths': paths, 'oracle': oracle, 'frames': frames}


def _dir_with(tmp_path, files):
    """A checkpoint dir holding ``files``: name -> source path or bytes."""
    directory = tmp_path / 'checkpoints'
    directory.mkdir()
    for name, source in files.items():
        if isinstance(source, (bytes, bytearray)):
            (directory / name).write_bytes(source)
        else:
            shutil.copyfile(source, directory / name)
    return directory


# ------------------------------------------------------------------------------ kills
def test_sigkill_during_learn_task_keeps_every_completed_task(tmp_path):
    rng = random.Random(SEED)
    print(f'\nCBPNET_KILL_SEED={SEED}')
    directory = tmp_path / 'checkpoints'
    frames = _frames()
    with Started(tmp_path, directory) as node:
        node.ready()
        node.teach({'red': RED, 'blue': BLUE})
        reply = node.client.call_trigger('~/learn_task', timeout=300)
        assert reply.success, reply.message
        assert json.loads(reply.message)['checkpoint'].endswith('cbpnet-000001.pt')
        before = node.predict(frames)
        # A second, long task: 2 x 40 samples, 500 epochs (thousands of steps).
        node.teach({'green': GREEN, 'yellow': YELLOW}, per_class=40, seed=1)
        assert all(r.successful for r in node.client.set_parameters({'epochs': 500}))
        progress = node.client.collect('~/learning_progress')
        future = node.client.call_async(Trigger, '~/learn_task')
        assert progress.wait_for(timeout=120) is not None, read_log(node.proc)
        delay = rng.uniform(0.1, 2.0)
        time.sleep(delay)
        assert not future.done(), 'the second task finished before the kill: make it longer'
        last = progress.snapshot()[-1]
        assert last['step'] < last['steps'] or last['epoch'] < last['epochs'], last
        node.proc.kill()
        node.proc.wait(30)
        print(f'killed during learn_task after {delay:.2f} s at step {last["step"]}/'
              f'{last["steps"]}')
    assert _checkpoint_files(directory) == ['cbpnet-000001.pt']
    assert not [n for n in os.listdir(directory) if n.startswith('.')]  # nothing was saving

    with Started(tmp_path, directory) as node:
        labels = node.labels()
        assert labels['model_version'] == 1
        assert labels['tasks'] == [{'task_id': 0, 'classes': ['blue', 'red']}]
        after = node.predict(frames)
        _same_predictions(after, before)
        assert all(p['model_version'] == 1 for p in after.values())


def _temps(directory):
    return [n for n in os.listdir(directory) if n.startswith('.cbpnet-') and '.tmp-' in n]


def _kill_during_a_save(tmp_path, directory, kill_at):
    """Run ``~/save`` in a loop and SIGKILL the node the moment the ``kill_at``-th checkpoint
    write has its temporary file open. Returns (completed saves, errors before the kill)."""
    saves, errors = [], []
    with Started(tmp_path, directory) as node:
        node.ready()
        assert node.client.call_trigger('~/save', timeout=60).success  # warm: loaded
        stop, killed = threading.Event(), threading.Event()

        def save_loop():
            # One ~/save after the other, as fast as the node answers, until it is killed.
            while not stop.is_set():
                try:
                    future = node.client.call_async(Trigger, '~/save', timeout=10)
                except Exception as exc:  # noqa: BLE001 - counted below
                    if not killed.is_set():
                        errors.append(exc)
                    return
                while not future.done():
                    if stop.is_set():
                        return
                    time.sleep(0.002)
                saves.append(future.result().success)

        thread = threading.Thread(target=save_loop, daemon=True)
        thread.start()
        writes, was_present = 0, False
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and node.proc.poll() is None:
            present = bool(_temps(directory))
            writes += present and not was_present
            was_present = present
            if writes >= kill_at:
                node.proc.kill()
                killed.set()
                break
            time.sleep(0.0005)
        node.proc.wait(30)
        stop.set()
        thread.join(40)
        assert killed.is_set(), f'saw only {writes} checkpoint writes in 120 s'
    return saves, errors


def test_sigkill_during_save_never_leaves_a_loadable_half_file(tmp_path, reference):
    rng = random.Random(SEED + 1)
    paths = reference['paths']
    print(f'\nCBPNET_KILL_SEED={SEED}')
    # The kill is aimed at a write in progress; a write can still finish between seeing its
    # temporary file and the kill, so up to three nodes are tried until one kill lands inside.
    for attempt in range(3):
        directory = tmp_path / f'attempt{attempt}'
        directory.mkdir()
        shutil.copyfile(paths[1], directory / 'cbpnet-000001.pt')
        shutil.copyfile(paths[2], directory / 'cbpnet-000002.pt')
        kill_at = rng.randint(1, 4)
        saves, errors = _kill_during_a_save(tmp_path, directory, kill_at)
        left = sorted(os.listdir(directory))
        temps = _temps(directory)
        print(f'attempt {attempt}: killed in checkpoint write {kill_at} after {len(saves)} '
              f'completed saves; left behind: {left}')
        assert not errors, f'~/save failed before the kill: {errors}'
        # The kill_at-th write starts only after the loop got the answer to the one before.
        assert len(saves) >= kill_at - 1 and all(saves), (kill_at, saves)
        assert set(_checkpoint_files(directory)) == {'cbpnet-000001.pt', 'cbpnet-000002.pt'}
        for name in _checkpoint_files(directory):
            payload = ckpt.read_checkpoint(str(directory / name))  # complete and loadable
            assert payload['model_version'] == int(name[7:13])
        kept = set(left) - set(temps) - {RUNTIME_CACHE_DIR}
        assert kept == {'cbpnet-000001.pt', 'cbpnet-000002.pt'}
        if temps:
            break
    assert temps, 'no SIGKILL landed inside a checkpoint write in 3 tries'

    # A stale temporary file must never be loaded, even a complete one of a newer version.
    decoy = ckpt.read_checkpoint(paths[2])
    decoy.update(model_version=99, classes=['decoy'], tasks=[['decoy']])
    torch.save(decoy, str(directory / '.cbpnet-000099.pt.tmp-424242'))
    with Started(tmp_path, directory) as node:
        labels = node.labels()
        assert labels['model_version'] == 2 and 'decoy' not in labels['classes']
        _same_predictions(node.predict(reference['frames']), reference['oracle'][2])
        saved = node.client.call_trigger('~/save', timeout=60)
        assert saved.success, saved.message
        # The next successful write clears the temporary files of killed writers.
        assert sorted(set(os.listdir(directory)) - {RUNTIME_CACHE_DIR}) == [
            'cbpnet-000001.pt', 'cbpnet-000002.pt']


# ------------------------------------------------------------------------------ bad files
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, reference):
    paths = reference['paths']
    newest = Path(paths[2]).read_bytes()
    directory = _dir_with(tmp_path, {'cbpnet-000001.pt': paths[1],
                                     'cbpnet-000002.pt': newest[:len(newest) // 2]})
    with Started(tmp_path, directory) as node:
        labels = node.labels()
        assert labels['model_version'] == 1, read_log(node.proc)
        assert labels['tasks'] == [{'task_id': 0, 'classes': ['blue', 'red']}]
        _same_predictions(node.predict(reference['frames']), reference['oracle'][1])
        log = Path(node.proc.log_path).read_text(errors='replace')
        errors = [line for line in log.splitlines() if 'skipping checkpoint' in line]
        assert errors and 'ERROR' in errors[0] and 'cbpnet-000002.pt' in errors[0], log
        assert (directory / 'cbpnet-000002.pt').stat().st_size == len(newest) // 2  # kept
        # Learning goes on from the fallback model; the corrupt file is replaced.
        node.teach({'purple': PURPLE, 'cyan': CYAN}, seed=3)
        reply = node.client.call_trigger('~/learn_task', timeout=300)
        assert reply.success, reply.message
    assert ckpt.read_checkpoint(str(directory / 'cbpnet-000002.pt'))['classes'] == [
        'blue', 'red', 'cyan', 'purple']
    assert _checkpoint_files(directory) == ['cbpnet-000001.pt', 'cbpnet-000002.pt']


@pytest.mark.parametrize('change, words', [
    ({'backbone': 'vit_tiny_patch16_224'}, ['backbone', 'vit_tiny_patch16_224']),
    ({'schema_version': ckpt.SCHEMA_VERSION + 1}, ['schema']),
])
def test_checkpoint_of_another_backbone_or_schema_stops_the_node(tmp_path, reference, change,
                                                                 words):
    foreign = ckpt.read_checkpoint(reference['paths'][2])
    foreign.update(change)
    directory = _dir_with(tmp_path, {'cbpnet-000001.pt': reference['paths'][1]})
    torch.save(foreign, str(directory / 'cbpnet-000002.pt'))
    before = _digest(directory)
    with Started(tmp_path, directory) as node:
        code = node.proc.wait(180)
        log = read_log(node.proc)
    assert code == 2, log
    assert 'Refusing to start' in log and 'left untouched' in log, log
    for word in words:
        assert word in log, log
    assert _digest(directory) == before  # not overwritten, not deleted, not touched


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


def test_malicious_pickle_checkpoint_is_refused_and_never_run(tmp_path, reference):
    marker = tmp_path / 'PWNED'
    # Prove the payload is armed: a plain (unsafe) torch.load of the same kind of file runs it.
    armed, proof = tmp_path / 'armed.pt', tmp_path / 'ARMED'
    torch.save({'format': ckpt.FORMAT, 'evil': _Exploit(proof)}, str(armed))
    subprocess.run([sys.executable, '-c', 'import sys, torch; '
                    'torch.load(sys.argv[1], weights_only=False)', str(armed)],
                   env=ros_env(), check=False, timeout=120, capture_output=True)
    assert proof.exists(), 'the exploit does not work, so the test would prove nothing'

    directory = _dir_with(tmp_path, {
        'cbpnet-000001.pt': reference['paths'][1],
        # a torch zip checkpoint and a bare pickle, both newer than the valid one
        'cbpnet-000009.pt': pickle.dumps({'format': ckpt.FORMAT, 'evil': _Exploit(marker)}),
    })
    torch.save({'schema_version': ckpt.SCHEMA_VERSION, 'format': ckpt.FORMAT,
                'backbone': 'tf_efficientnet_lite0', 'evil': _Exploit(marker)},
               str(directory / 'cbpnet-000007.pt'))
    evil = {name: _digest(directory)[name] for name in ('cbpnet-000007.pt', 'cbpnet-000009.pt')}
    with Started(tmp_path, directory) as node:
        labels = node.labels()
        assert labels['model_version'] == 1, read_log(node.proc)
        _same_predictions(node.predict(reference['frames']), reference['oracle'][1])
        log = Path(node.proc.log_path).read_text(errors='replace')
        skipped = [line for line in log.splitlines() if 'skipping checkpoint' in line]
        assert any('cbpnet-000009.pt' in line for line in skipped), log
        assert any('cbpnet-000007.pt' in line and 'weights-only' in line for line in skipped)
        # A new task is saved as version 2; the previous valid checkpoint is kept (the two
        # refused files, which look newer, must not take its place) and they stay untouched.
        node.teach({'green': GREEN, 'yellow': YELLOW}, seed=4)
        reply = node.client.call_trigger('~/learn_task', timeout=300)
        assert reply.success, reply.message
    assert not marker.exists(), 'the malicious checkpoint ran code in the node'
    assert _checkpoint_files(directory) == ['cbpnet-000001.pt', 'cbpnet-000002.pt',
                                            'cbpnet-000007.pt', 'cbpnet-000009.pt']
    assert {name: _digest(directory)[name] for name in evil} == evil
