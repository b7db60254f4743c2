"""The README stays true: every declared parameter and every interface name is documented."""
from pathlib import Path

from ros2_cbpnet.node import PARAMETERS

README = (Path(__file__).resolve().parents[1] / 'README.md').read_text()


def test_readme_documents_every_parameter():
    missing = [name for name in PARAMETERS if f'`{name}`' not in README]
    assert not missing, f'README.md lacks parameters {missing} (scripts/param_table.py)'


def test_readme_documents_every_topic_and_service():
    for name in ('~/labelled_images', '~/labelled_images/compressed', '~/teach',
                 '~/learn_task', '~/clear_buffer', '~/save', '~/predictions',
                 '~/learning_progress', '~/labels', '~/debug_image', '/diagnostics',
                 'cbpnet: inference', 'cbpnet: learner', 'cbpnet: cbp block', 'cbpnet: prompts'):
        assert name in README, name


def test_readme_shows_the_two_commands():
    assert 'make demo' in README and 'make test' in README
