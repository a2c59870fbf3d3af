""" count_flops: fvcore with the ops it skips counted, reproducing the published figures. """
from pathlib import Path

import pytest
import timm
import torch
from fvcore.nn import FlopCountAnalysis

from timm_hybrid.flops import UncountedOpError, count_flops

# fvcore GMACs at 224 of the baselines (DeiT paper / timm's tables; TNT as fvcore counts timm's TNT)
REFERENCE_GMACS = {
    'deit_small_patch16_224': 4.61,
    'deit_tiny_patch16_224': 1.26,
    'tnt_s_patch16_224': 5.25,
    'tnt_b_patch16_224': 14.10,
}


def _set_fused_attn(model: torch.nn.Module, enable: bool) -> torch.nn.Module:
    for m in model.modules():
        if hasattr(m, 'fused_attn'):
            m.fused_attn = enable
    return model


@pytest.mark.parametrize('fused', [True, False])
@pytest.mark.parametrize('name', sorted(REFERENCE_GMACS))
def test_reference_figures_with_and_without_fused_attention(name, fused):
    model = _set_fused_attn(timm.create_model(name), fused)
    result = count_flops(model)
    assert result.gmacs == pytest.approx(REFERENCE_GMACS[name], rel=0.005)
    assert not result.unsupported


def test_fused_attention_is_counted_where_plain_fvcore_drops_it():
    model = _set_fused_attn(timm.create_model('deit_small_patch16_224'), True).eval()
    plain = FlopCountAnalysis(model, torch.zeros(1, 3, 224, 224))
    plain.unsupported_ops_warnings(False)
    plain.uncalled_modules_warnings(False)
    ours = count_flops(model)
    assert plain.total() / 1e9 == pytest.approx(4.25, abs=0.01)  # what plain fvcore silently reports
    attention = 12 * 6 * 197 * 197 * 64 * 2 / 1e9  # 12 blocks, 6 heads: q@k^T and attn@v
    assert ours.by_operator['scaled_dot_product_attention'] == pytest.approx(attention)
    assert ours.gmacs == pytest.approx(plain.total() / 1e9 + attention)


class _Unsupported(torch.nn.Module):
    def forward(self, x):
        return torch.linalg.inv(x[0, 0, :4, :4] + torch.eye(4))


def test_uncounted_matrix_op_is_an_error_or_a_loud_warning(caplog):
    with pytest.raises(UncountedOpError, match='aten::linalg_inv'):
        count_flops(_Unsupported(), input_size=(1, 8, 8))
    result = count_flops(_Unsupported(), input_size=(1, 8, 8), strict=False)
    assert 'aten::linalg_inv' in result.unsupported
    assert 'could not count' in caplog.text


def test_elementwise_ops_are_listed_and_sum_to_the_total():
    result = count_flops('cnt_nano_patch7_28', input_size=(1, 28, 28))
    assert 'aten::gelu' in result.uncounted and not result.unsupported
    assert result.params == sum(p.numel() for p in timm.create_model('cnt_nano_patch7_28').parameters())
    assert sum(result.by_operator.values()) == pytest.approx(result.gmacs)


def test_default_input_size_is_the_models_own():
    nano = count_flops('cnt_nano_patch7_28')
    assert nano.input_size == (1, 28, 28)
    assert nano.gmacs == count_flops('cnt_nano_patch7_28', input_size=(1, 28, 28)).gmacs
    assert count_flops('cnt_nano_patch7_28', img_size=56).input_size == (1, 56, 56)
    assert count_flops(timm.create_model('deit_nano_patch7_28', in_chans=3)).input_size == (3, 28, 28)


# One small config per family: (name, create_model kwargs). Not inner_impl='matmul': FlopCounterMode counts the
# GEMM it runs (16/9 of the 3x3 convs' MACs: the matrix holds the padding zeros), count_flops the convolution the
# block defines (traced, the block runs its conv form), by design
FAMILY_CONFIGS = {
    'cnt': ('cnt_nano_patch7_28', {}),
    'cnt_distilled': ('cnt_nano_distilled_patch7_28', {}),
    'cnt_attn_inner': ('cnt_nano_patch7_28', dict(inner_block='attn')),
    'tnt': ('tnt_nano_patch7_28', {}),
    'deit': ('deit_nano_distilled_patch7_28', {}),
    'transcnn': ('transcnn_tiny', dict(img_size=128)),
    'hatnet': ('hatnet_tiny', dict(img_size=112)),
    'refiner': ('refiner_vit_small_patch16_224', dict(img_size=112, depth=2)),
}
# fvcore operators with matrix / conv work, the kinds FlopCounterMode has formulas for; fvcore also counts norms and
# pooling (its other handles), which FlopCounterMode does not
MATRIX_OPERATORS = {'conv', 'linear', 'matmul', 'bmm', 'einsum', 'scaled_dot_product_attention'}
NORM_AND_POOL_OPERATORS = {'layer_norm', 'batch_norm', 'group_norm', 'instance_norm', 'adaptive_avg_pool2d'}


def _flop_counter_macs(model: torch.nn.Module, input_size) -> float:
    """ GMACs by torch's FlopCounterMode (it counts FLOPs = 2 x MACs). Its formulas cover the CUDA attention kernels
    but not the CPU one, `_scaled_dot_product_flash_attention_for_cpu`: mapped to torch's own SDPA formula. """
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa_flop})
    with counter, torch.no_grad():
        model(torch.zeros(1, *input_size))
    return counter.get_total_flops() / 2 / 1e9


@pytest.mark.parametrize('family', sorted(FAMILY_CONFIGS))
def test_count_flops_agrees_with_torch_flop_counter(family):
    name, kwargs = FAMILY_CONFIGS[family]
    model = timm.create_model(name, **kwargs).eval()
    ours = count_flops(model)
    assert set(ours.by_operator) <= MATRIX_OPERATORS | NORM_AND_POOL_OPERATORS, ours.by_operator
    matrix_gmacs = sum(v for k, v in ours.by_operator.items() if k in MATRIX_OPERATORS)
    # torch's counter counts what eager runs; CNT's 'auto' inner block may run as GEMMs (16/9 the MACs, the padding
    # zeros included), while GMACs are those of the convolution the block defines: count the conv computation
    conv_computation = dict(inner_impl='conv') if family.startswith('cnt') else {}
    reference = timm.create_model(name, **kwargs, **conv_computation).eval()
    assert matrix_gmacs == pytest.approx(_flop_counter_macs(reference, ours.input_size), rel=0.03)


def test_cli_prints_params_and_gmacs_by_operator(capsys):
    from timm_hybrid.cli import main
    assert main(['flops', 'cnt_nano_patch7_28', 'deit_nano_patch7_28', '--model-kwargs', 'img_size=56']) == 0
    out = capsys.readouterr().out
    for name in ('cnt_nano_patch7_28', 'deit_nano_patch7_28'):
        f = count_flops(name, img_size=56)
        assert f'{name}: {f.mparams:.3f} M params, {f.gmacs:.5f} GMACs per 1x56x56 image' in out
    block = out.split('deit_nano_patch7_28:')[0]  # CNT's operators, largest first
    shown = [line.split()[0] for line in block.splitlines()[1:]]
    cnt = count_flops('cnt_nano_patch7_28', img_size=56).by_operator
    assert shown == sorted(cnt, key=lambda op: -cnt[op])


@pytest.mark.parametrize('argv, message', [
    (['flops', 'no_such_model'], 'Unknown model (no_such_model)'),
    (['flops', 'cnt_nano_patch7_28', '--model-kwargs', 'no_such_kwarg=1'],
     "unexpected keyword argument 'no_such_kwarg'"),
])
def test_cli_user_errors_are_one_line_and_exit_2(argv, message, capsys):
    from timm_hybrid.cli import main
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count('\n') == 1


def test_fvcore_is_imported_only_when_flops_are_counted():
    """ fvcore (with iopath, yacs) takes seconds to import: loading a model and its weights does not need it. """
    import subprocess
    import sys
    script = Path(__file__).with_name('fvcore_import_check.py')
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ['False', 'True']
