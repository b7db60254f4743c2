"""Lint (as ros2/demos packages do): pyflakes and pycodestyle at 99 columns."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_flake8():
    pytest.importorskip('flake8')
    result = subprocess.run(
        [sys.executable, '-m', 'flake8', '--max-line-length', '99',
         '--select', 'E,W,F', '--extend-ignore', 'W503,W504',
         'ros2_cbpnet', 'test', 'scripts', 'launch', 'setup.py'],
        cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
