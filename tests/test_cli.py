""" The `timm-hybrid` console script: export / push / run / compare sub-commands (data is tested in test_data.py). """
import json
import subprocess
import sys

import huggingface_hub
import pytest
import timm
import torch

from timm_hybrid.cli import main


@pytest.fixture
def checkpoint(tmp_path):
    model = timm.create_model('cnt_nano_patch7_28')
    path = tmp_path / 'last.pth.tar'
    torch.save({'epoch': 1, 'state_dict': model.state_dict()}, path)
    return path


def test_export_and_push_exit_codes(checkpoint, tmp_path, monkeypatch, capsys):
    out = tmp_path / 'cnt_nano_patch7_28.fmnist'
    assert main(['export', 'cnt_nano_patch7_28', '--checkpoint', str(checkpoint), '--output', str(out),
                 '--accuracy', 'top1=71.5', 'top5=98.25', '--train-command', 'train.py --epochs 1']) == 0
    assert f"local-dir:{out}" in capsys.readouterr().out
    assert json.loads((out / 'config.json').read_text())['architecture'] == 'cnt_nano_patch7_28'
    card = (out / 'README.md').read_text()
    assert 'top1 (test split): 71.50 %' in card and 'top5 (test split): 98.25 %' in card

    assert main(['export', 'cnt_nano_patch7_28', '--checkpoint', str(checkpoint), '--output', str(tmp_path / 'x'),
                 '--num-classes', '3']) == 2
    assert 'shape mismatch: head.weight' in capsys.readouterr().err

    monkeypatch.delenv('HF_TOKEN', raising=False)
    monkeypatch.delenv('HUGGING_FACE_HUB_TOKEN', raising=False)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_TOKEN_PATH', str(tmp_path / 'no_token'))
    assert main(['push', str(out), '--repo-id', 'timm-hybrid/cnt_nano_patch7_28.fmnist']) == 2
    assert 'No Hugging Face token' in capsys.readouterr().err


def test_run_executes_script_as_main_with_models_registered(tmp_path):
    """ In a fresh interpreter: the script never imports timm_hybrid, yet creates a CNT by name. """
    script = tmp_path / 'tool.py'
    (tmp_path / 'tool_helper.py').write_text('VALUE = 7\n')  # importable from the script's folder
    script.write_text(
        'import sys, timm, tool_helper\n'
        'if __name__ == "__main__":\n'
        '    model = timm.create_model("cnt_nano_patch7_28")\n'
        '    print(type(model).__name__, tool_helper.VALUE, sys.argv[1:])\n'
        '    sys.exit(int(sys.argv[-1]))\n')
    proc = subprocess.run([sys.executable, '-m', 'timm_hybrid.cli', 'run', str(script), '--model', 'x', '3'],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.strip() == "CNT 7 ['--model', 'x', '3']"


def test_run_restores_argv_and_missing_script_is_an_error(tmp_path, capsys):
    script = tmp_path / 'ok.py'
    script.write_text('import sys\nassert sys.argv[1:] == ["--flag"]\n')
    argv = list(sys.argv)
    assert main(['run', str(script), '--flag']) == 0
    assert sys.argv == argv
    assert main(['run', str(tmp_path / 'absent.py')]) == 2
    assert 'no script' in capsys.readouterr().err


@pytest.mark.parametrize('models, swept', [
    (None, ['cnt_s_patch16_224', 'tnt_s_patch16_224', 'deit_small_patch16_224']),
    (['cnt_ti_patch16_224', 'cnt_nano_patch7_28', 'transcnn_small'], ['cnt_ti_patch16_224']),
    (['cnt_nano_patch7_28', 'tnt_nano_patch7_28'], None),
])
def test_compare_full_sweeps_only_requested_224px_models(models, swept, monkeypatch):
    import timm_hybrid.compare as compare
    calls = {}
    monkeypatch.setattr(compare, 'compare_models', lambda names, **kw: calls.setdefault('compared', list(names)))
    monkeypatch.setattr(compare, 'resolution_sweep', lambda names, **kw: calls.setdefault('swept', list(names)))
    assert main(['compare', '--full', *(['--models', *models] if models else [])]) == 0
    assert calls.get('swept') == swept
    if models:
        assert calls['compared'] == models


def test_compare_with_own_references_writes_ratios_to_them(tmp_path):
    """ The 28 px models compared against the 28 px baselines (not the 224 px TNT-S / DeiT-S defaults): ratio columns
    are named after the references, a reference's ratio to itself is exactly 1, and every output file is written. """
    out = tmp_path / 'nano'
    assert main(['compare', '--models', 'cnt_nano_patch7_28', 'tnt_nano_patch7_28', '--references',
                 'tnt_nano_patch7_28', 'deit_nano_patch7_28', '--batch-size', '2', '--threads', '1', '--repeats', '4',
                 '--output', str(out)]) == 0
    rows = {r['model']: r for r in json.loads((out / 'compare.json').read_text())['rows']}
    assert list(rows) == ['cnt_nano_patch7_28', 'tnt_nano_patch7_28']  # references are timed, not reported
    assert rows['tnt_nano_patch7_28']['infer_x_tnt_nano'] == 1.0
    assert rows['tnt_nano_patch7_28']['train_x_tnt_nano'] == 1.0
    assert rows['cnt_nano_patch7_28']['infer_x_deit_nano'] > 0 and 'infer_x_tnt_s' not in rows['cnt_nano_patch7_28']
    assert rows['cnt_nano_patch7_28']['gmacs'] == 0.00825  # three significant digits, not 0.008
    assert json.loads((out / 'compare.json').read_text())['meta']['repeats'] == 4
    assert rows['cnt_nano_patch7_28']['input'] == 28 and rows['cnt_nano_patch7_28']['train_peak_mb'] >= 0
    assert {p.suffix for p in out.iterdir()} == {'.csv', '.md', '.json', '.png'}


def test_compare_without_references_is_an_error():
    from timm_hybrid.compare import compare_models
    with pytest.raises(ValueError, match='at least one reference'):
        compare_models(['cnt_nano_patch7_28'], references=[])
