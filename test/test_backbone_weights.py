"""Weight loading: embedded ImageNet weights, local files, and clear failures."""
import cv2
import numpy as np
import pytest
import torch

from ros2_cbpnet.learning.model import BackboneLoadError, backbone_parameter_count, load_backbone

# ImageNet-1k indices of espresso-like classes: espresso, cup, coffee mug, coffeepot.
COFFEE_CLASSES = {967, 968, 504, 505}


def test_embedded_backbone_classifies_the_coffee_photo():
    skimage_data = pytest.importorskip('skimage.data')
    bb = load_backbone('tf_efficientnet_lite0')
    img = cv2.resize(skimage_data.coffee(), (224, 224), interpolation=cv2.INTER_AREA)
    x = torch.from_numpy(img).permute(2, 0, 1).float().div(255).unsqueeze(0)
    mean = torch.tensor(bb.mean).view(1, 3, 1, 1)
    std = torch.tensor(bb.std).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = bb.model((x - mean) / std)
    top5 = set(logits.topk(5).indices[0].tolist())
    assert logits.argmax().item() in COFFEE_CLASSES, top5
    assert bb.feature_dim == 1280 and bb.mean == (0.5, 0.5, 0.5)


def test_random_weights_differ_from_the_embedded_ones():
    a = load_backbone('tf_efficientnet_lite0')
    b = load_backbone('tf_efficientnet_lite0', 'random')
    assert not torch.equal(a.model.conv_stem.weight, b.model.conv_stem.weight)


def test_local_checkpoint_file_is_loaded(tmp_path):
    src = load_backbone('vit_tiny_patch16_224', 'random', model_kwargs=dict(depth=2))
    path = str(tmp_path / 'vit.pth')
    torch.save(src.model.state_dict(), path)
    loaded = load_backbone('vit_tiny_patch16_224', path, model_kwargs=dict(depth=2))
    for (k, v), (_, w) in zip(src.model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(v, w), k


def test_mismatched_local_checkpoint_is_refused(tmp_path):
    path = str(tmp_path / 'other.pth')
    torch.save({'unrelated.weight': torch.zeros(3)}, path)
    with pytest.raises(BackboneLoadError, match='does not fit'):
        load_backbone('vit_tiny_patch16_224', path, model_kwargs=dict(depth=2))


def test_missing_local_checkpoint_says_so():
    with pytest.raises(BackboneLoadError, match='does not exist'):
        load_backbone('tf_efficientnet_lite0', '/nonexistent/weights.pth')


def test_unknown_backbone_name_is_refused():
    with pytest.raises(BackboneLoadError, match='unknown backbone'):
        load_backbone('not_a_real_model_xyz')


def test_hub_weights_unreachable_tell_the_user_what_to_do(monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(BackboneLoadError) as info:
        load_backbone('vit_tiny_patch16_224.augreg_in21k', model_kwargs=dict(depth=1))
    message = str(info.value)
    assert 'backbone_checkpoint' in message and 'tf_efficientnet_lite0' in message
    assert 'HF_HUB_OFFLINE' in message


@pytest.mark.slow
def test_vit_b16_trainable_share_is_under_the_paper_bound():
    """design.md: the paper claims < 0.2% extra parameters for ViT-B/16 (no weights needed)."""
    from ros2_cbpnet.learning.learner import ContinualLearner, LearnerConfig
    bb = load_backbone('vit_base_patch16_224', 'random')
    learner = ContinualLearner(LearnerConfig(backbone='vit_base_patch16_224',
                                             backbone_checkpoint='random'), backbone=bb)
    learner.state.add_task()
    learner.state.add_classes(10, 0)
    counts = learner.parameter_counts()
    assert counts['backbone_params'] == backbone_parameter_count(bb) > 85_000_000
    assert counts['trainable_params'] / counts['backbone_params'] < 0.002


def test_grey_and_odd_sized_images_are_accepted_by_preprocess():
    from ros2_cbpnet.learning.learner import ContinualLearner, LearnerConfig
    learner = ContinualLearner(LearnerConfig(image_size=32, backbone_checkpoint='random'))
    x = learner.preprocess([np.zeros((7, 50), np.uint8), np.full((100, 20, 3), 255, np.uint8),
                            np.zeros((5, 5, 1), np.uint8)])
    assert x.shape == (3, 3, 32, 32)
    assert torch.allclose(x[1], torch.ones_like(x[1]))  # (255/255 - 0.5) / 0.5
