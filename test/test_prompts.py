"""Backbone adapters and prompts: prefix-tuning correctness, selection, growth."""
import pytest
import torch

from ros2_cbpnet.learning.model import LearnedState, load_backbone


@pytest.fixture(scope='module')
def vit():
    torch.manual_seed(0)
    return load_backbone('vit_tiny_patch16_224', 'random', image_size=32,
                         model_kwargs=dict(depth=5))


@pytest.fixture(scope='module')
def cnn():
    return load_backbone('tf_efficientnet_lite0', 'random')


def _timm_features(bb, x):
    return bb.model.forward_head(bb.model.forward_features(x), pre_logits=True)


def test_vit_query_is_the_frozen_cls_feature(vit):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(vit.query(x), _timm_features(vit, x), atol=1e-5)
    assert not any(p.requires_grad for p in vit.parameters())


def test_empty_prefix_reproduces_the_frozen_backbone(vit):
    x = torch.randn(3, 3, 32, 32)
    empty = {i: [torch.zeros(3, 2, 0, vit.embed_dim)] for i in (0, 2, 4)}
    with torch.no_grad():
        assert torch.allclose(vit.forward_prompted(x, empty), _timm_features(vit, x), atol=1e-5)


def _features(st, bb, x, task_ids):
    """The CBP block's output for a batch, each sample with its own E-prompt."""
    return st.cbp(st.prompted_features(bb, bb.trunk(x, st.first_layer), task_ids))


def _state(bb, **kw):
    torch.manual_seed(1)
    st = LearnedState(bb, **kw)
    for t in range(3):
        st.add_task()
        st.add_classes(2, t)
    with torch.no_grad():
        for e in st.prompts.e_prompts:  # make each task's prompts clearly different
            for p in e.values():
                p.add_(torch.randn_like(p))
    return st.eval()


def test_batch_mixing_e_prompts_equals_each_sample_alone(vit):
    st = _state(vit, g_prompt_layers=[0, 1], e_prompt_layers=[2, 3, 4])
    x = torch.randn(4, 3, 32, 32)
    task_ids = torch.tensor([2, 0, 1, 0])
    with torch.no_grad():
        mixed = _features(st, vit, x, task_ids)
        alone = torch.cat([_features(st, vit, x[i:i + 1], task_ids[i:i + 1]) for i in range(4)])
        swapped = _features(st, vit, x, task_ids.flip(0))
    assert torch.allclose(mixed, alone, atol=1e-5)
    # The prompts matter: another assignment of tasks gives other features.
    assert not torch.allclose(mixed, swapped, atol=1e-3)


def test_prefix_keeps_sequence_length_and_changes_output(vit):
    st = _state(vit, g_prompt_layers=[0], e_prompt_layers=[1])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        prompted = _features(st, vit, x, torch.tensor([0, 0]))
    assert prompted.shape == (2, vit.feature_dim)
    assert not torch.allclose(prompted, _timm_features(vit, x), atol=1e-3)


def test_cnn_zero_prompts_are_identity_and_mixed_batch_is_per_sample(cnn):
    x = torch.randn(3, 3, 64, 64)
    st = LearnedState(cnn, g_prompt_layers=[5], e_prompt_layers=[6, 7])
    st.add_task()
    st.add_classes(2, 0)
    st.eval()
    with torch.no_grad():
        z = cnn.prompted_from_trunk(cnn.trunk(x, st.first_layer), st.first_layer,
                                    st.prompts.prompts_for(torch.tensor([0, 0, 0])))
        assert torch.allclose(z, _timm_features(cnn, x), atol=1e-5)
    st = _state(cnn, g_prompt_layers=[5], e_prompt_layers=[6, 7])
    ids = torch.tensor([1, 2, 0])
    with torch.no_grad():
        mixed = _features(st, cnn, x, ids)
        alone = torch.cat([_features(st, cnn, x[i:i + 1], ids[i:i + 1])
                           for i in range(3)])
    assert torch.allclose(mixed, alone, atol=1e-4)


def test_trunk_sharing_matches_the_full_pass(cnn):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full = cnn.query(x)
        shared = cnn.query_from_trunk(cnn.trunk(x, 5), 5)
    assert torch.allclose(full, shared, atol=1e-5)


def test_new_e_prompt_starts_from_the_previous_one_with_a_fresh_key(vit):
    st = LearnedState(vit, g_prompt_layers=[0], e_prompt_layers=[1, 2])
    st.add_task()
    with torch.no_grad():
        st.prompts.e_prompts[0]['1'].fill_(0.25)
    st.add_task()
    assert torch.equal(st.prompts.e_prompts[1]['1'], st.prompts.e_prompts[0]['1'])
    assert st.prompts.e_prompts[1]['1'] is not st.prompts.e_prompts[0]['1']
    assert not torch.equal(st.prompts.prompt_keys[0], st.prompts.prompt_keys[1])
    assert st.prompts.e_prompts[0]['2'].shape == (2, 5, vit.embed_dim)


def test_key_selection_picks_the_most_similar_key(vit):
    st = _state(vit, prompt_selection='key', g_prompt_layers=[0], e_prompt_layers=[1])
    keys = torch.stack(list(st.prompts.prompt_keys)).detach()
    queries = keys[[2, 0, 1]] * 3.0 + 0.01 * torch.randn(3, keys.shape[1])
    post = st.task_posterior(queries)
    assert post.argmax(1).tolist() == [2, 0, 1]


@pytest.mark.parametrize('mode', ['lda', 'class_mean'])
def test_class_statistics_select_the_task_of_the_nearest_class(vit, mode):
    st = _state(vit, prompt_selection=mode, g_prompt_layers=[0], e_prompt_layers=[1])
    d = vit.feature_dim
    torch.manual_seed(3)
    centres = torch.randn(6, d) * 3
    labels = torch.arange(6).repeat_interleave(20)
    feats = centres[labels] + 0.3 * torch.randn(len(labels), d)
    st.stats.add(labels, feats)
    probe = centres[[5, 0, 3]] + 0.3 * torch.randn(3, d)
    post = st.task_posterior(probe)
    assert post.argmax(1).tolist() == [2, 0, 1]  # classes 5, 0, 3 belong to tasks 2, 0, 1
    assert torch.allclose(post.sum(1), torch.ones(3), atol=1e-5)


def test_task_conditional_prediction_is_a_distribution(vit):
    st = _state(vit, prompt_selection='lda', prediction='task', g_prompt_layers=[0],
                e_prompt_layers=[1])
    labels = torch.arange(6).repeat_interleave(5)
    st.stats.add(labels, torch.randn(30, vit.feature_dim))
    probs, task_ids = st.predict(vit, torch.randn(4, 3, 32, 32))
    assert probs.shape == (4, 6) and task_ids.shape == (4,)
    assert torch.allclose(probs.sum(1), torch.ones(4), atol=1e-4)


def test_growth_keeps_old_head_rows(vit):
    st = LearnedState(vit, g_prompt_layers=[0], e_prompt_layers=[1])
    st.add_task()
    st.add_classes(2, 0)
    old = st.head.weight.detach().clone()
    st.add_task()
    st.add_classes(3, 1)
    assert st.num_classes == 5 and st.class_task.tolist() == [0, 0, 1, 1, 1]
    assert torch.equal(st.head.weight[:2], old)


def test_out_of_range_prompt_layer_is_refused(vit):
    with pytest.raises(ValueError, match='out of range'):
        LearnedState(vit, e_prompt_layers=[99])
