""" timm_hybrid.layers: each insertion function on at least two timm hosts.

Per (function, host): the host's logits at insertion (random host weights loaded from a file, eval and train mode),
host keys unchanged, the new layers trained from the first step, forward_intermediates, gradient checkpointing, FX,
no graph break under torch.compile, FLOPs counted completely; one inductor compile (eval forward + training step) per
function on a tiny host.
"""
import copy

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models._features_fx import create_feature_extractor, get_graph_node_names

from timm_hybrid import count_flops
from timm_hybrid.layers import (
    HMHSA, AttentionMapHandOn, ConvolvedTNTBlock, RefinedAttention, add_hmhsa, convolve_inner, inner_conv_block,
    inserted_state_keys, refine_attention,
)

# case -> (host, create kwargs, input (C, H, W), insertion function, its kwargs). Odd, non-square CNN inputs: H-MHSA
# pads its windows and pooling cells there
CASES = {
    'hmhsa-resnet18': ('resnet18', {}, (3, 72, 56), add_hmhsa, {}),
    'hmhsa-resnet50-stages23': ('resnet50', {}, (3, 64, 64), add_hmhsa, dict(stages=(2, 3))),
    'hmhsa-convnext_atto': ('convnext_atto', {}, (3, 72, 56), add_hmhsa, {}),
    'hmhsa-efficientnet_b0': ('efficientnet_b0', {}, (3, 64, 48), add_hmhsa, {}),
    'refine-deit_tiny': ('deit_tiny_patch16_224', dict(img_size=64), (3, 64, 64), refine_attention, {}),
    'refine-deit_tiny_distilled-some': (
        'deit_tiny_distilled_patch16_224', dict(img_size=64), (3, 64, 64), refine_attention, dict(blocks=(1, 4, -1))),
    'refine-vit_qk_norm': (
        'vit_small_patch16_224', dict(img_size=32, depth=3, qk_norm=True), (3, 32, 32), refine_attention, {}),
    'refine-deit_nano': ('deit_nano_patch7_28', {}, (1, 28, 28), refine_attention, {}),
    'cnt-tnt_s': ('tnt_s_patch16_224', dict(img_size=64, depth=4), (3, 64, 64), convolve_inner, {}),
    'cnt-tnt_nano': ('tnt_nano_patch7_28', {}, (1, 28, 28), convolve_inner, {}),
    'cnt-tnt_micro-bottleneck': ('tnt_micro_patch4_28', {}, (1, 28, 28), convolve_inner, dict(bottleneck=True)),
}
HOSTS = sorted(CASES)


def _host(case: str) -> torch.nn.Module:
    name, kwargs, _, _, _ = CASES[case]
    model = timm.create_model(name, **kwargs)
    with torch.no_grad():  # no zero-initialised residual left in the host: every path of it shows in the logits
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
    return model


def _image(case: str, batch_size: int = 2) -> torch.Tensor:
    return torch.randn(batch_size, *CASES[case][2])


def _insert(case: str, model: torch.nn.Module) -> torch.nn.Module:
    _, _, _, insert, kwargs = CASES[case]
    return insert(model, **kwargs)


def _leave_identity(model: torch.nn.Module) -> torch.nn.Module:
    """ The inserted layers' zero-initialised last layers set to non-zero values, so that they change the output. """
    with torch.no_grad():
        for key in inserted_state_keys(model):
            tensor = model.get_parameter(key) if key in dict(model.named_parameters()) else None
            if tensor is not None and not tensor.abs().sum():
                tensor.normal_(0., 0.5)
    return model


@pytest.mark.parametrize('case', HOSTS)
def test_host_logits_unchanged_at_insertion_from_a_weights_file(case, tmp_path):
    host = _host(case)
    save_file(host.state_dict(), tmp_path / 'host.safetensors')
    hybrid = _host(case)  # other random weights, then the file's
    hybrid.load_state_dict(load_file(tmp_path / 'host.safetensors'))
    _insert(case, hybrid)
    x = _image(case)
    for train in (False, True):
        host.train(train)
        hybrid.train(train)
        with torch.no_grad():
            assert (hybrid(x) - host(x)).abs().max() < 1e-5, f'train={train}'


@pytest.mark.parametrize('case', HOSTS)
def test_host_keys_unchanged_only_inserted_keys_missing(case):
    host = _host(case)
    hybrid = _insert(case, copy.deepcopy(host))
    new = inserted_state_keys(hybrid)
    assert new and set(hybrid.state_dict()) - set(new) == set(host.state_dict())
    result = _insert(case, _host(case)).load_state_dict(host.state_dict(), strict=False)
    # torch fills in a BatchNorm's missing num_batches_tracked instead of reporting it
    assert result.missing_keys == [k for k in new if not k.endswith('.num_batches_tracked')]
    assert not result.unexpected_keys


@pytest.mark.parametrize('case', HOSTS)
def test_training_moves_away_from_the_host(case):
    """ Every new parameter gets a gradient on the first step (non-zero for the zero-initialised last layers, which
    the rest of the branch waits for), and one SGD step on the new parameters alone changes the logits. """
    model = _insert(case, _host(case)).train()
    x = _image(case)
    with torch.no_grad():
        before = model.eval()(x)
    model.train()
    model(x).square().mean().backward()
    params = dict(model.named_parameters())
    new = [k for k in inserted_state_keys(model) if k in params]
    assert all(params[k].grad is not None and torch.isfinite(params[k].grad).all() for k in new)
    zero_init = [k for k in new if not params[k].detach().abs().sum()]
    assert any(params[k].grad.abs().sum() > 0 for k in zero_init), zero_init
    with torch.no_grad():
        for k in new:
            params[k].sub_(params[k].grad, alpha=1.)
    with torch.no_grad():
        assert (model.eval()(x) - before).abs().max() > 1e-4


@pytest.mark.parametrize('case', HOSTS)
def test_forward_intermediates_match_the_host_at_insertion(case):
    host = _host(case).eval()
    hybrid = _insert(case, copy.deepcopy(host)).eval()
    x = _image(case, 1)
    with torch.no_grad():
        expected = host.forward_intermediates(x, intermediates_only=True)
        got = hybrid.forward_intermediates(x, intermediates_only=True)
    assert len(got) == len(expected)
    assert all((g - e).abs().max() < 1e-5 for g, e in zip(got, expected))


@pytest.mark.parametrize('case', HOSTS)
def test_gradient_checkpointing_same_loss_and_gradients(case):
    """ With the layers away from the identity: timm's checkpointing re-runs each block (H-MHSA inside its stage, a
    refined block with the map handed on in the forward pass) and gives the same gradients. """
    model = _leave_identity(_insert(case, _host(case))).train()
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        model.eval()  # the checkpointed re-run would update BatchNorm stats twice (timm's checkpoint, any host)
    x = _image(case)
    results = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        loss = model(x).square().mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss0, grads0), (loss1, grads1) = results
    torch.testing.assert_close(loss1, loss0)
    assert grads1.keys() == grads0.keys()
    for n, g in grads0.items():
        torch.testing.assert_close(grads1[n], g, atol=1e-6, rtol=1e-4, msg=lambda m: f'{n}: {m}')


@pytest.mark.parametrize('case', HOSTS)
def test_fx_and_no_graph_break_under_compile(case):
    model = _leave_identity(_insert(case, _host(case))).eval()
    x = _image(case)
    with torch.no_grad():
        expected = model(x)
        _, eval_nodes = get_graph_node_names(model)
        fx_model = create_feature_extractor(model, return_nodes=[eval_nodes[-1]])
        fx_logits = next(iter(fx_model(x).values()))
        if CASES[case][3] is convolve_inner:  # the graph runs the inner block's convolutions, eager CPU its GEMM form
            torch.testing.assert_close(fx_logits, expected, atol=1e-5, rtol=1e-5)  # for narrow blocks (InnerResBlock)
        else:
            assert torch.equal(fx_logits, expected)  # to the bit, as timm's test_model_forward_fx asks
    torch._dynamo.reset()  # training mode: the hand-on keeps its maps, BatchNorms take batch statistics
    explanation = torch._dynamo.explain(model.train())(x)
    assert explanation.graph_break_count == 0, [str(r) for r in explanation.break_reasons]


@pytest.mark.parametrize('case', HOSTS)
def test_torchscript_scripts_hmhsa_and_refuses_the_others_by_name(case):
    """ H-MHSA hybrids script and give the eager logits; the refined and convolved ones cannot (a Python hand-on
    object, a call to the timm base block's forward) and say so before TorchScript fails inside. """
    model = _leave_identity(_insert(case, _host(case))).eval()
    if CASES[case][3] is add_hmhsa:
        x = _image(case)
        with torch.no_grad():
            torch.testing.assert_close(torch.jit.script(model)(x), model(x), atol=1e-4, rtol=1e-4)
    else:
        layer = 'RefinedAttention' if CASES[case][3] is refine_attention else 'ConvolvedTNTBlock'
        with pytest.raises(RuntimeError, match=rf'\({layer}\) does not script: .* Use torch.compile or FX instead'):
            torch.jit.script(model)


@pytest.mark.parametrize('case', HOSTS)
def test_flops_counted_completely_and_above_the_host(case):
    size = CASES[case][2]
    host = _host(case)
    hybrid_flops = count_flops(_insert(case, copy.deepcopy(host)), input_size=size)  # strict: every op counted
    assert hybrid_flops.gmacs > count_flops(host, input_size=size).gmacs
    assert hybrid_flops.params > sum(p.numel() for p in host.parameters())


# one inductor compile per insertion function on a tiny host (inductor generates C++ per graph: its time grows with
# the number of ops, so one or two blocks each)
CASES.update({
    'compiled-hmhsa': ('resnet18', dict(layers=(1, 1, 1, 1)), (3, 40, 40), add_hmhsa, dict(stages=3)),  # windowed
    'compiled-refine': ('deit_nano_patch7_28', dict(depth=2), (1, 28, 28), refine_attention, {}),
    'compiled-cnt': ('tnt_nano_patch7_28', dict(depth=2), (1, 28, 28), convolve_inner, {}),
})
COMPILED = ('compiled-hmhsa', 'compiled-refine', 'compiled-cnt')


@pytest.mark.parametrize('case', COMPILED)
def test_inductor_compiled_forward_and_training_step_match_eager(case):
    model = _leave_identity(_insert(case, _host(case)))
    x = _image(case)
    torch._dynamo.reset()
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, backend='inductor', fullgraph=True)
    compiled_model.eval()
    with torch.no_grad():
        assert (compiled(x) - model.eval()(x)).abs().max() < 1e-4
    model.train()
    compiled_model.train()
    outs = []
    for module, fn in ((model, model), (compiled_model, compiled)):
        out = fn(x)
        out.square().mean().backward()
        outs.append((out.detach(), {n: p.grad for n, p in module.named_parameters()}))
    assert (outs[1][0] - outs[0][0]).abs().max() < 1e-4
    for n, g in outs[0][1].items():
        assert (outs[1][1][n] - g).abs().max() <= 1e-4 * max(1., g.abs().max().item()), n


def test_hand_on_links_the_refined_blocks_and_keeps_no_map_after_inference():
    model = refine_attention(_host('refine-deit_tiny').eval(), blocks=(0, 2, 5))
    attns = [model.blocks[i].attn for i in (0, 2, 5)]
    chain = attns[0].hand_on_chain
    assert isinstance(chain, AttentionMapHandOn) and all(a.hand_on_chain is chain for a in attns)
    assert [a.chain_position for a in attns] == [0, 1, 2] and not hasattr(attns[0], 'hand_on')
    assert all(a.hand_on.shape == (3, 1, 1) and not a.hand_on.any() for a in attns[1:])
    x = _image('refine-deit_tiny')
    with torch.no_grad():
        before = model(x)
        assert chain.maps == {}  # inference: the last refined block drops the map
        attns[1].hand_on.fill_(1.)
        assert (model(x) - before).abs().max() > 1e-4  # block 2 now receives block 0's map
    with pytest.raises(RuntimeError, match='runs before refined attention 0'):
        model.blocks[2](torch.randn(2, 17, 192))  # one block alone: nothing was handed on in this pass


def test_refined_model_copies_and_saves_after_a_training_step(tmp_path):
    """ The handed-on maps are scratch of one pass: a deepcopy (timm's EMA) or torch.save after a training step gets
    an empty hand-on, still shared by the copy's blocks. """
    model = refine_attention(_host('refine-deit_nano')).train()
    x = _image('refine-deit_nano')
    model(x).mean().backward()
    for copied in (copy.deepcopy(model), _saved_and_loaded(model, tmp_path / 'model.pt')):
        chains = {id(b.attn.hand_on_chain) for b in copied.blocks}
        assert len(chains) == 1 and copied.blocks[0].attn.hand_on_chain.maps == {}
        assert chains != {id(model.blocks[0].attn.hand_on_chain)}
        with torch.no_grad():
            torch.testing.assert_close(copied.eval()(x), model.eval()(x))


def _saved_and_loaded(model: torch.nn.Module, path) -> torch.nn.Module:
    torch.save(model, path)
    return torch.load(path, weights_only=False)


def test_refined_attention_as_timm_attn_layer():
    """ `attn_layer=RefinedAttention` builds a ViT with every block refined (no hand-on); with the host's weights
    loaded it starts as the host. """
    host = timm.create_model('deit_tiny_patch16_224', img_size=32, depth=2).eval()
    model = timm.create_model('deit_tiny_patch16_224', img_size=32, depth=2, attn_layer=RefinedAttention).eval()
    assert all(type(b.attn) is RefinedAttention for b in model.blocks)
    result = model.load_state_dict(host.state_dict(), strict=False)
    new = inserted_state_keys(model)
    assert result.missing_keys == [k for k in new if not k.endswith('.num_batches_tracked')]
    assert not result.unexpected_keys
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (model(x) - host(x)).abs().max() < 1e-5


def test_inner_conv_block_is_a_residual_branch():
    """ CNT's block without the activation after the add: the identity at init, also on negative pixel tokens (a zero
    last BatchNorm alone would leave ReLU(x)). """
    block = inner_conv_block(8, (4, 4)).train()
    x = torch.randn(6, 16, 8)
    assert torch.equal(block(x), x)
    with torch.no_grad():
        block.conv_block.bn2.weight.fill_(1.)
    assert (block(x) - x).abs().max() > 1e-2 and (block(x) < 0).any()


@pytest.mark.parametrize('insert, host, error', [
    (add_hmhsa, 'deit_tiny_patch16_224', 'neither an nn.Sequential'),  # a ViT's feature levels are its blocks
    (refine_attention, 'resnet18', 'blocks'),
    (convolve_inner, 'cnt_nano_patch7_28', "timm's TNT"),
])
def test_insertion_into_a_host_it_does_not_fit_is_refused(insert, host, error):
    with pytest.raises(TypeError, match=error):
        insert(timm.create_model(host))


@pytest.mark.parametrize('case', ['hmhsa-resnet18', 'refine-deit_nano', 'cnt-tnt_nano'])
def test_inserting_twice_is_refused(case):
    model = _insert(case, _host(case))
    with pytest.raises((TypeError, ValueError)):
        _insert(case, model)


def test_hmhsa_levels_windows_and_pooling_follow_the_reduction():
    model = add_hmhsa(timm.create_model('resnet18'), stages=(2, 3, 4))
    layers = [model.layer2.hmhsa, model.layer3.hmhsa, model.layer4.hmhsa]
    assert all(isinstance(m, HMHSA) for m in layers)
    # reduction 8, 16, 32: keys pooled by 4 and 2 (every level's global attention sees the reduction-32 map), then
    # TransCNN's last-stage global MHSA
    assert [(m.attn.window_size, m.attn.pool_ratio) for m in layers] == [(7, 4), (7, 2), (1, 1)]
    assert [m.attn.num_heads for m in layers] == [2, 4, 8]  # 64 channels per head
    with pytest.raises(ValueError, match='out of range'):
        add_hmhsa(timm.create_model('resnet18'), stages=(5,))


def test_convolved_tnt_block_keeps_its_class_api():
    model = convolve_inner(timm.create_model('tnt_nano_patch7_28'), blocks=(-1,))
    assert [type(b) is ConvolvedTNTBlock for b in model.blocks] == [False] * 5 + [True]
    assert isinstance(model.blocks[-1], timm.models.tnt.Block)
