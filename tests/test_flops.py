""" count_flops: fvcore with the ops it skips counted, reproducing the published figures. """
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
