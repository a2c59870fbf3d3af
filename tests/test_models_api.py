""" The timm model API, checked the same way for every model timm_hybrid registers. """
import pytest
import timm
import torch
from timm.models import group_parameters
from timm.models._features_fx import create_feature_extractor, get_graph_node_names

from conftest import hybrid_model_names

MODELS = hybrid_model_names()


# 64 px keeps every model's structure (all blocks, stages and heads) at a fraction of the 224 px cost
SMALL_SIZE = 64


def _create(name: str, **kwargs) -> torch.nn.Module:
    """ The model at a small input size where its default is larger. """
    default_size = timm.models.get_pretrained_cfg(name).input_size[-1]
    if default_size > SMALL_SIZE:
        kwargs.setdefault('img_size', SMALL_SIZE)
    return timm.create_model(name, **kwargs)


def _image(model: torch.nn.Module, batch_size: int = 1) -> torch.Tensor:
    in_chans = model.pretrained_cfg['input_size'][0]
    size = min(model.pretrained_cfg['input_size'][-1], SMALL_SIZE)
    return torch.randn(batch_size, in_chans, size, size)


def test_every_family_registered():
    families = {timm.models.model_entrypoint(n).__module__.rsplit('.', 1)[-1] for n in MODELS}
    assert families == {'cnt', 'baselines', 'transcnn', 'refiner'}
    assert set(timm.list_models('cnt*')) >= {
        'cnt_ti_patch16_224', 'cnt_s_patch16_224', 'cnt_b_patch16_224',
        'cnt_ti_distilled_patch16_224', 'cnt_s_distilled_patch16_224', 'cnt_b_distilled_patch16_224'}


@pytest.mark.parametrize('name', MODELS)
def test_forward_backward_every_param_gets_grad(name):
    model = _create(name).train()
    out = model(_image(model, 2))
    assert out.shape == (2, model.num_classes)
    out.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f'parameters without gradient: {no_grad}'
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize('name', MODELS)
def test_head_api(name):
    model = _create(name).eval()
    x = _image(model)
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(features), logits)
        pre_logits = model.forward_head(features, pre_logits=True)
        assert pre_logits.shape == (1, model.head_hidden_size)
        heads = model.get_classifier()
        heads = heads if isinstance(heads, tuple) else (heads,)
        assert all(h.weight.shape == (model.num_classes, model.head_hidden_size) for h in heads)
        model.reset_classifier(7)
        assert model(x).shape == (1, 7)
        model.reset_classifier(0)
        assert model(x).shape == (1, model.num_features)


@pytest.mark.parametrize('name', MODELS)
def test_param_groups_cover_every_parameter(name):
    model = _create(name)
    groups = group_parameters(model, model.group_matcher())
    grouped = [p for names in groups.values() for p in names]
    assert sorted(grouped) == sorted(n for n, _ in model.named_parameters())
    params = {n for n, _ in model.named_parameters()}
    no_decay = model.no_weight_decay()
    assert no_decay and any(n in params for n in no_decay), f'no_weight_decay() names no parameter: {no_decay}'


@pytest.mark.parametrize('name', MODELS)
def test_forward_intermediates_and_features_only(name):
    model = _create(name).eval()
    x = _image(model)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x, indices=2)
        torch.testing.assert_close(final, model.forward_features(x))
        assert len(intermediates) == 2 and all(t.ndim == 4 and t.shape[0] == 1 for t in intermediates)

        features = _create(name, features_only=True).eval()
        features.load_state_dict(model.state_dict(), strict=False)
        maps = features(x)
        assert [m.shape[1] for m in maps] == features.feature_info.channels()
        H, W = x.shape[-2:]
        assert [(m.shape[2], m.shape[3]) for m in maps] == [
            (H // r, W // r) for r in features.feature_info.reduction()]


@pytest.mark.parametrize('name', MODELS)
def test_grad_checkpointing_same_outputs_grads_and_norm_stats(name):
    model = _create(name).train()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    x = _image(model, 2)
    results = []
    for enable in (False, True):
        model.load_state_dict(initial)
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        out = model(x)
        out.square().mean().backward()
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, buffers))
    torch.testing.assert_close(results[1][0], results[0][0])
    for n, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][n], g, atol=1e-6, rtol=1e-4, msg=lambda m: f'{n}: {m}')
    # the backward re-run must not update BatchNorm running stats a second time
    for n, b in results[0][2].items():
        torch.testing.assert_close(results[1][2][n], b, msg=lambda m: f'{n}: {m}')


@pytest.mark.parametrize('name', MODELS)
def test_torchscript_and_fx_match_eager(name):
    """ The FX graph of a fresh model gives the eager logits to the bit, as timm's own test_model_forward_fx asks (one
    image: eager CPU chunking does not apply; CNT's narrow inner blocks, GEMMs eagerly on CPU and convolutions in the
    graph, agree to the bit only while their last BatchNorm is zero, as at init; trained, within rounding:
    test_layers.py); TorchScript runs its own kernels, so within rounding. """
    model = _create(name).eval()
    x = _image(model)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), expected, atol=1e-4, rtol=1e-4)
        _, eval_nodes = get_graph_node_names(model)
        fx_model = create_feature_extractor(model, return_nodes=[eval_nodes[-1]])
        fx_logits = next(iter(fx_model(x).values()))
        assert torch.equal(fx_logits, expected), (fx_logits - expected).abs().max()


@pytest.mark.parametrize('name', MODELS)
def test_eval_is_independent_of_batch_composition(name):
    model = _create(name).eval()
    x = _image(model, 3)
    with torch.no_grad():
        alone = model(x[:1])
        together = model(x)
    torch.testing.assert_close(together[:1], alone, atol=1e-5, rtol=1e-4)


# --- timm's model contract (issue 18), on shallow configs: every block type, a fraction of the depth --------------

def _shallow(name: str, **kwargs) -> torch.nn.Module:
    """ The model with 2 blocks (1 per stage for TransCNN / HAT-Net), at the small size. """
    depth = dict(depths=(1, 1, 1, 1)) if name.startswith(('transcnn', 'hatnet')) else dict(depth=2)
    return _create(name, **depth, **kwargs)


def _modules_and_tensors(model: torch.nn.Module):
    floating = [(n, t) for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_floating_point()]
    return [n for n, m in model.named_modules() if m.training != model.training], floating


@pytest.mark.parametrize('mode', ['eval', 'train'])
@pytest.mark.parametrize('name', MODELS)
def test_reset_classifier_builds_the_head_on_the_models_device_dtype_and_mode(name, mode):
    """ timm's models build a new head where the model lives (meta, float64 here) and leave every module's train /
    eval mode as it was; ours made it on CPU / float32 (TransCNN) or in training mode (CNT, Refiner). """
    model = timm.create_model(name, device='meta', **({'img_size': SMALL_SIZE} if 'patch16_224' in name else {}))
    model.to(device='meta', dtype=torch.float64)
    getattr(model, mode)()
    model.reset_classifier(0)
    no_heads = model.get_classifier()
    no_heads = no_heads if isinstance(no_heads, tuple) else (no_heads,)
    assert all(isinstance(h, torch.nn.Identity) for h in no_heads), f'num_classes=0 left heads {no_heads}'
    model.reset_classifier(2)
    wrong_mode, floating = _modules_and_tensors(model)
    assert not wrong_mode, f'modules not in {mode} mode after reset_classifier: {wrong_mode}'
    off = [(n, t.device.type, t.dtype) for n, t in floating if t.device.type != 'meta' or t.dtype != torch.float64]
    assert not off, f'tensors off the model device / dtype after reset_classifier: {off}'
    heads = model.get_classifier()
    heads = heads if isinstance(heads, tuple) else (heads,)
    assert [h.out_features for h in heads] == [2] * len(heads) and model.num_classes == 2


@pytest.mark.parametrize('name', MODELS)
def test_default_cfg_names_real_modules_and_matching_sizes(name):
    """ first_conv / classifier name modules of the model (timm adapts and drops weights by these names), mean / std
    have one value per input channel, pool_size is the unpooled map at the cfg's input size. """
    model = timm.create_model(name, device='meta').eval()
    cfg = model.pretrained_cfg
    modules = dict(model.named_modules())
    first_convs = (cfg['first_conv'],) if isinstance(cfg['first_conv'], str) else cfg['first_conv']
    for conv in first_convs:
        assert isinstance(modules.get(conv), torch.nn.Conv2d), conv
        assert modules[conv].in_channels == cfg['input_size'][0]
    classifiers = (cfg['classifier'],) if isinstance(cfg['classifier'], str) else cfg['classifier']
    for classifier in classifiers:
        assert isinstance(modules.get(classifier), torch.nn.Linear), classifier
        assert modules[classifier].out_features == cfg['num_classes'] == model.num_classes
    assert len(cfg['mean']) == len(cfg['std']) == cfg['input_size'][0]
    features = model.forward_features(torch.empty(1, *cfg['input_size'], device='meta'))
    if cfg.get('pool_size'):
        assert tuple(features.shape[-2:]) == tuple(cfg['pool_size'])
    else:
        assert features.ndim == 3  # a token sequence: nothing to pool spatially


@pytest.mark.parametrize('name', MODELS)
def test_features_only_takes_each_out_index(name):
    model = _shallow(name).eval()
    x = _image(model)
    num_features = len(model.feature_info)
    for index in range(num_features):
        features = _shallow(name, features_only=True, out_indices=(index,)).eval()
        features.load_state_dict(model.state_dict(), strict=False)
        (feature_map,) = features(x)
        info = model.feature_info[index]
        assert feature_map.shape[1] == info['num_chs'], index
        assert feature_map.shape[-1] == x.shape[-1] // info['reduction'], index


@pytest.mark.parametrize('name', MODELS)
def test_forward_intermediates_stop_early_and_prune_agree_with_forward_features(name):
    model = _shallow(name).eval()
    x = _image(model)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x, indices=[0])
        torch.testing.assert_close(final, model.forward_features(x))
        early = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], intermediates[0])
        assert model.prune_intermediate_layers(indices=[0], prune_head=True) == [0]
        pruned = model.forward_intermediates(x, indices=[0], intermediates_only=True)
        torch.testing.assert_close(pruned[0], intermediates[0])
        assert model.num_classes == 0


# timm's own TNT / VisionTransformer classes (the baselines) name tokens they may lack ('reg_token'): not ours
OUR_CLASSES = [n for n in MODELS if not timm.models.model_entrypoint(n).__module__.endswith('.baselines')]


@pytest.mark.parametrize('name', OUR_CLASSES)
def test_no_weight_decay_names_only_parameters(name):
    model = timm.create_model(name, device='meta')
    params = {n for n, _ in model.named_parameters()}
    names = model.no_weight_decay()
    assert names and names <= params, f'not parameters: {names - params}'


@pytest.mark.parametrize('pos_embed', ['sincos', 'none'])
def test_no_weight_decay_of_cnt_without_learned_encodings(pos_embed):
    model = timm.create_model('cnt_nano_patch7_28', patch_pos_embed=pos_embed, pixel_pos_embed=pos_embed, depth=1)
    assert model.no_weight_decay() == {'cls_token'}


@pytest.mark.parametrize('name', OUR_CLASSES)
def test_torchscript_and_fx_match_eager_in_training_mode(name):
    """ Training mode takes other branches (batch-statistics BatchNorm, the plain inner block, distilled heads);
    dropout and drop path are off by default, so outputs are deterministic. """
    model = _shallow(name).train()
    x = _image(model, 2)
    expected = model(x)
    torch.testing.assert_close(torch.jit.script(model).train()(x), expected, atol=1e-4, rtol=1e-4)
    train_nodes, _ = get_graph_node_names(model)
    fx_model = create_feature_extractor(model, return_nodes=[train_nodes[-1]]).train()
    torch.testing.assert_close(next(iter(fx_model(x).values())), expected, atol=1e-4, rtol=1e-4)


CHUNKED = ['transcnn_tiny', 'hatnet_tiny', 'refiner_vit_small_patch16_224']


@pytest.mark.parametrize('name', CHUNKED)
def test_cpu_chunks_give_the_whole_batchs_outputs(name):
    """ In eval on CPU the large-map families run a batch in chunks (cpu_chunk): same logits as the whole
    batch, the stem run once per chunk; cpu_chunk=0, and training with auto chunks that the batch fits, run the batch
    whole (training in chunks: tests/test_transcnn.py, tests/test_refiner.py). """
    small = {'depth': 4} if 'refiner' in name else {'depths': (1, 1, 1, 1)}
    model = _create(name, cpu_chunk=2, **small).eval()
    stem = model.stem if hasattr(model, 'stem') else model.patch_embed
    batch_sizes = []
    stem.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    x = _image(model, batch_size=5)
    with torch.no_grad():
        chunked = model(x)
        assert batch_sizes == [2, 2, 1]
        model.cpu_chunk = 0
        whole = model(x)
    assert batch_sizes[3:] == [5]
    assert chunked.shape == whole.shape == (5, model.num_classes)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)
    model.cpu_chunk = None  # auto: the small config's maps fit, so the batch runs whole
    model.train()(x).sum().backward()
    assert batch_sizes[4:] == [5]


def test_cpu_chunk_is_sized_from_the_largest_map():
    """ Auto chunks keep the maps one op touches under 24 MiB: Refiner-S's expanded maps are 12 heads x 3 x 197^2
    tokens x 4 bytes = 5.3 MiB an image, an eval op reads one and writes one, so 2 images a chunk (depth 2: the
    maps are as large). """
    model = timm.create_model('refiner_vit_small_patch16_224', depth=2).eval()
    assert model._per_sample_activation_bytes() == 2 * 12 * 3 * 197 ** 2 * 4
    batch_sizes = []
    model.patch_embed.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    with torch.no_grad():
        model(torch.randn(5, 3, 224, 224))
        model(torch.randn(2, 3, 224, 224))  # fits: whole
    assert batch_sizes == [2, 2, 1, 2]
    with pytest.raises(ValueError, match='cpu_chunk must be an integer >= 0'):
        timm.create_model('transcnn_tiny', cpu_chunk=-1)
