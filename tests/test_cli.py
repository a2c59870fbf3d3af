""" The `timm-hybrid` console script: help, version, export / push / run / compare sub-commands (data is tested in
test_data.py, compare's measuring functions in test_compare.py). """
import csv
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch

from timm_hybrid.cli import main


def console_script(name: str) -> str:
    """ The entry point installed beside this interpreter (PATH may first hold a shell shim, e.g. pyenv's). """
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


@pytest.fixture
def checkpoint(tmp_path):
    model = timm.create_model('cnt_nano_patch7_28')
    path = tmp_path / 'last.pth.tar'
    torch.save({'epoch': 1, 'state_dict': model.state_dict()}, path)
    return path


def test_export_and_push_exit_codes(checkpoint, tmp_path, monkeypatch, capsys):
    out = tmp_path / 'cnt_nano_patch7_28.fmnist'
    assert main(['export', 'cnt_nano_patch7_28', '--checkpoint', str(checkpoint), '--output', str(out),
                 '--accuracy', 'top1=71.5', 'top5=98.25', '--train-command', 'train.py --epochs 1',
                 '--teacher', 'timm-hybrid/resnet18.fmnist']) == 0
    assert f"local-dir:{out}" in capsys.readouterr().out
    assert json.loads((out / 'config.json').read_text())['architecture'] == 'cnt_nano_patch7_28'
    card = (out / 'README.md').read_text()
    assert 'top1 (test split): 71.50 %' in card and 'top5 (test split): 98.25 %' in card
    assert huggingface_hub.ModelCard.load(out / 'README.md').data.base_model == 'timm-hybrid/resnet18.fmnist'

    assert main(['export', 'cnt_nano_patch7_28', '--checkpoint', str(checkpoint), '--output', str(tmp_path / 'x'),
                 '--num-classes', '3']) == 2
    assert 'shape mismatch: head.weight' in capsys.readouterr().err

    monkeypatch.delenv('HF_TOKEN', raising=False)
    monkeypatch.delenv('HUGGING_FACE_HUB_TOKEN', raising=False)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_TOKEN_PATH', str(tmp_path / 'no_token'))
    assert main(['push', str(out), '--repo-id', 'timm-hybrid/cnt_nano_patch7_28.fmnist']) == 2
    assert 'No Hugging Face token' in capsys.readouterr().err


@pytest.mark.parametrize('launcher', [
    ['timm-hybrid'],  # the console script, which registers the models only for the sub-commands that need them
    [sys.executable, '-m', 'timm_hybrid.cli'],
])
def test_run_executes_script_as_main_with_models_registered(launcher, tmp_path):
    """ In a fresh interpreter: the script never imports timm_hybrid, yet creates a CNT by name. """
    script = tmp_path / 'tool.py'
    (tmp_path / 'tool_helper.py').write_text('VALUE = 7\n')  # importable from the script's folder
    script.write_text(
        'import sys, timm, tool_helper\n'
        'if __name__ == "__main__":\n'
        '    model = timm.create_model("cnt_nano_patch7_28")\n'
        '    print(type(model).__name__, tool_helper.VALUE, sys.argv[1:])\n'
        '    sys.exit(int(sys.argv[-1]))\n')
    launcher = [console_script(launcher[0]), *launcher[1:]]
    proc = subprocess.run([*launcher, 'run', str(script), '--model', 'x', '3'], capture_output=True, text=True,
                          timeout=120)
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


def test_help_lists_every_command_without_importing_torch():
    """ `timm-hybrid --help` is answered before torch, timm or fvcore are imported (they take seconds), and names
    every sub-command with its one-line help. """
    from timm_hybrid.cli import COMMANDS
    proc = subprocess.run([sys.executable, '-X', 'importtime', console_script('timm-hybrid'), '--help'],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for name, (help_line, _, _) in COMMANDS.items():
        assert re.search(rf'^\s+{name}\s+{re.escape(help_line)}$', proc.stdout, re.M), name
    imported = {line.rsplit('|', 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith('import time')}
    assert 'argparse' in imported and not imported & {'torch', 'timm', 'fvcore'}


def test_version(capsys):
    import timm_hybrid
    with pytest.raises(SystemExit) as e:
        main(['--version'])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f'timm-hybrid {timm_hybrid.__version__}'
    assert timm_hybrid.__version__ == importlib.metadata.version('timm-hybrid')


@pytest.fixture
def recorded_compare(monkeypatch, tmp_path):
    """ compare_models / resolution_sweep replaced by recorders: what the CLI asks for, without timing. """
    import timm_hybrid.compare as compare
    calls = {}

    def compare_models(names, **kw):
        calls.update(compared=list(names), **kw)
        return [dict(model=n) for n in names]

    def resolution_sweep(names, **kw):
        calls.update(swept=list(names), sweep_settings=kw['settings'])
        return [dict(model=n) for n in names]
    monkeypatch.setattr(compare, 'compare_models', compare_models)
    monkeypatch.setattr(compare, 'resolution_sweep', resolution_sweep)
    monkeypatch.chdir(tmp_path)
    return calls


@pytest.mark.parametrize('models, swept', [
    (None, ['cnt_s_patch16_224', 'tnt_s_patch16_224', 'deit_small_patch16_224']),
    (['cnt_ti_patch16_224', 'cnt_nano_patch7_28', 'transcnn_small'], ['cnt_ti_patch16_224']),
    (['cnt_nano_patch7_28', 'tnt_nano_patch7_28'], None),
])
def test_compare_full_sweeps_only_requested_224px_models(models, swept, recorded_compare):
    assert main(['compare', '--full', *(['--models', *models] if models else [])]) == 0
    assert recorded_compare.get('swept') == swept
    assert len(recorded_compare['compared']) == (len(models) if models else 12)


@pytest.mark.parametrize('argv, batch_size, repeats', [
    ([], 8, 3),  # quick: the CLI's own default no longer overrides it (it was 32)
    (['--full'], 32, 7),
    (['--batch-size', '4'], 4, 3),
    (['--full', '--repeats', '2'], 32, 2),
])
def test_compare_defaults_quick_s_trio_outside_the_source_tree(argv, batch_size, repeats, recorded_compare, capsys):
    assert main(['compare', *argv]) == 0
    settings = recorded_compare['settings']
    assert (settings.batch_size, settings.repeats, settings.device) == (batch_size, repeats, 'cpu')
    assert 1 <= settings.threads <= torch.get_num_threads()
    if not argv:
        assert recorded_compare['compared'] == ['cnt_s_patch16_224', 'tnt_s_patch16_224', 'deit_small_patch16_224']
        assert 'timm-hybrid compare --full' in capsys.readouterr().out  # says how to get the full tables
    assert recorded_compare['output_dir'] == 'timm-hybrid-results/compare'  # relative: the current folder


def test_compare_malloc_setting_reaches_the_settings(recorded_compare, capsys):
    assert main(['compare', '--malloc', 'keep']) == 0
    assert recorded_compare['settings'].malloc == 'keep'
    assert main(['compare']) == 0
    assert recorded_compare['settings'].malloc == 'default'
    with pytest.raises(SystemExit) as e:
        main(['compare', '--malloc', 'never'])
    assert e.value.code == 2 and "invalid choice: 'never'" in capsys.readouterr().err


def test_compare_rejects_a_device_torch_does_not_have(capsys):
    if torch.cuda.is_available():
        pytest.skip('this machine has CUDA')
    assert main(['compare', '--device', 'cuda', '--models', 'cnt_nano_patch7_28']) == 2
    assert 'no CUDA device' in capsys.readouterr().err


@pytest.mark.parametrize('spec, message', [
    ('cnt_nano_patch7_28:depth', 'expected name:key=value'),
    ('nosuch_model:depth=2', 'unknown model(s): nosuch_model'),
    ('cnt_nano_patch7_28:nosuch=1', "unexpected keyword argument 'nosuch'"),
])
def test_compare_bad_model_spec_is_one_line_exit_2(spec, message, tmp_path, capsys):
    assert main(['compare', '--models', spec, '--no-speed', '--output', str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and 'Traceback' not in '\n'.join(err)


def test_compare_with_own_references_writes_ratios_to_them(tmp_path, capfd):
    """ The 28 px models compared against the 28 px baselines (not the 224 px TNT-S / DeiT-S defaults): ratio columns
    are named after the references, a reference's ratio to itself is exactly 1, every output file is written, and
    progress comes as plain lines on stderr (as a piped log sees them). """
    out = tmp_path / 'nano'
    assert main(['compare', '--models', 'cnt_nano_patch7_28', 'tnt_nano_patch7_28', '--references',
                 'tnt_nano_patch7_28', 'deit_nano_patch7_28', '--batch-size', '2', '--threads', '1', '--repeats', '4',
                 '--output', str(out)]) == 0
    saved = json.loads((out / 'compare.json').read_text())
    rows = {r['model']: r for r in saved['rows']}
    assert list(rows) == ['cnt_nano_patch7_28', 'tnt_nano_patch7_28']  # references are timed, not reported
    assert rows['tnt_nano_patch7_28']['infer_x_tnt_nano'] == 1.0
    assert rows['tnt_nano_patch7_28']['train_x_tnt_nano'] == 1.0
    assert rows['cnt_nano_patch7_28']['infer_x_deit_nano'] > 0 and 'infer_x_tnt_s' not in rows['cnt_nano_patch7_28']
    assert rows['cnt_nano_patch7_28']['infer_gmacs'] == 0.00825  # three significant digits, not 0.008
    assert 'threads=1, batch_size=2, repeats=4' in saved['meta']['settings']
    row = rows['cnt_nano_patch7_28']
    assert row['infer_img_size'] == 28 and row['train_peak_mem_mb'] >= 0
    assert row['infer_samples_per_sec'] == pytest.approx(2 / (row['infer_step_time'] / 1000), rel=1e-2)
    assert {p.suffix for p in out.iterdir()} == {'.csv', '.md', '.json', '.png'}
    assert 'Settings: device=cpu, threads=1, batch_size=2, repeats=4' in (out / 'compare.md').read_text()
    stderr = capfd.readouterr().err
    for stage in ('inference, group 1/1 done', 'train step, group 1/1 done',
                  'cnt_nano_patch7_28: train step peak memory', 'tnt_nano_patch7_28: train step peak memory'):
        assert re.search(rf'^\[\d+m\d\ds, ~\d+m\d\ds left\] {stage}', stderr, re.M), stage
    for kind in ('inference', 'train step'):
        for model in ('cnt_nano_patch7_28', 'tnt_nano_patch7_28', 'deit_nano_patch7_28'):
            assert re.search(rf'^\[\d+m\d\ds\]   {kind} {model}: [\d.]+ samples/s', stderr, re.M), (kind, model)


def test_compare_interrupted_keeps_the_models_already_measured(tmp_path, monkeypatch, capsys):
    """ Ctrl-C during the second model's memory measurement: the first model's row is complete on disk. """
    import timm_hybrid.compare as compare
    measured = []

    def peak_memory_mb(name, settings):
        if measured:
            raise KeyboardInterrupt
        measured.append(name)
        return 1.
    monkeypatch.setattr(compare, 'peak_memory_mb', peak_memory_mb)
    out = tmp_path / 'partial'
    assert main(['compare', '--models', 'cnt_nano_patch7_28', 'deit_nano_patch7_28', '--references',
                 'cnt_nano_patch7_28', '--batch-size', '2', '--repeats', '1', '--output', str(out)]) == 130
    assert 'interrupted' in capsys.readouterr().err
    with open(out / 'compare.csv') as f:
        rows = {r['model']: r for r in csv.DictReader(f)}
    assert float(rows['cnt_nano_patch7_28']['train_peak_mem_mb']) == 1.
    assert rows['deit_nano_patch7_28']['train_peak_mem_mb'] == ''  # counted and timed, memory not yet measured
    assert float(rows['deit_nano_patch7_28']['infer_samples_per_sec']) > 0
    assert float(rows['deit_nano_patch7_28']['infer_gmacs']) > 0


def test_compare_without_references_is_an_error():
    from timm_hybrid.compare import compare_models
    with pytest.raises(ValueError, match='at least one reference'):
        compare_models(['cnt_nano_patch7_28'], references=[])


# --- one error convention: every user error is one line on stderr and exit code 2 ---------------------------------

def _export(checkpoint, output, *extra):
    return ['export', 'cnt_nano_patch7_28', '--checkpoint', str(checkpoint), '--output', str(output), *extra]


USER_ERRORS = {
    # name: (argv with {ck} / {out} / {file} placeholders, what the line says)
    'unknown model': (['export', 'nope_model', '--checkpoint', '{ck}', '--output', '{out}'], 'Unknown model'),
    'unknown tag': (['export', 'cnt_nano_patch7_28.nope', '--checkpoint', '{ck}', '--output', '{out}'],
                    r'Invalid pretrained tag \(nope\)'),
    'output is a file': (_export('{ck}', '{file}'), 'is a file, not a folder'),
    'output not empty': (_export('{ck}', '{full}'), r'is not empty .*--overwrite'),
    'accuracy without =': (_export('{ck}', '{out}', '--accuracy', 'top1'), "'top1' is not KEY=VALUE"),
    'accuracy not a number': (_export('{ck}', '{out}', '--accuracy', 'top1=abc'), r'percentage in \[0, 100\]'),
    'model-kwargs without =': (_export('{ck}', '{out}', '--model-kwargs', 'depth'), "'depth' is not KEY=VALUE"),
    'model-kwargs not a number': (_export('{ck}', '{out}', '--model-kwargs', 'depth=abc'),
                                  "depth must be an integer >= 1, got 'abc'"),
    'compare unknown model': (_export('{ck}', '{out}', '--compare', 'unknown_model'), 'unknown model name'),
    'input size 0': (_export('{ck}', '{out}', '--input-size', '0', '28', '28'), '0 is out of range: it must be >= 1'),
    'input size of another model': (_export('{ck}', '{out}', '--input-size', '1', '32', '32'),
                                    r'not the size the model was built for \(\(1, 28, 28\)\)'),
    'std 0': (_export('{ck}', '{out}', '--std', '0'), '0 is out of range: it must be > 0'),
    'crop-pct -1': (_export('{ck}', '{out}', '--crop-pct', '-1'), '-1 is out of range: it must be > 0'),
    'num-classes -1': (_export('{ck}', '{out}', '--num-classes', '-1'), '-1 is out of range: it must be >= 0'),
    'compare unknown': (['compare', '--models', 'nope_model', '--no-speed'], r'unknown model\(s\): nope_model'),
    'compare threads 0': (['compare', '--threads', '0'], 'argument --threads: 0 is out of range'),
    'compare batch size 0': (['compare', '--batch-size', '0'], 'argument --batch-size: 0 is out of range'),
    'compare batch size -1': (['compare', '--batch-size', '-1'], 'argument --batch-size: -1 is out of range'),
    'compare repeats -2': (['compare', '--repeats', '-2'], 'argument --repeats: -2 is out of range'),
    'compare repeats 0': (['compare', '--repeats', '0'], 'argument --repeats: 0 is out of range'),
    'data train fraction 2': (['data', 'fashion-mnist', '--root', '{out}', '--train-fraction', '2'],
                              r'2 is out of range: it must be > 0 and <= 1'),
    'push bad repo id': (['push', '{full}', '--repo-id', 'not a repo id!', '--token', 'hf_x'],
                         r"repo id 'not a repo id!' is not ORG/NAME"),
}


@pytest.mark.parametrize('case', list(USER_ERRORS))
def test_user_error_is_one_line_on_stderr_and_exit_2(case, checkpoint, tmp_path, capsys):
    argv, message = USER_ERRORS[case]
    full = tmp_path / 'full'
    if '{full}' in argv:
        full.mkdir()
        for name in ('README.md', 'config.json', 'model.safetensors'):
            (full / name).write_text('{}')
    (tmp_path / 'a_file').write_text('x')
    argv = [a.format(ck=checkpoint, out=tmp_path / 'out', file=tmp_path / 'a_file', full=full) for a in argv]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    lines = err.splitlines()
    if argv[0] == 'compare' and 'importing torch' in err:  # its progress note while timm imports, not an error
        lines = lines[1:]
    assert code == 2 and len(lines) == 1 and lines[0].startswith('error: '), err
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / 'out').exists()


def test_compare_exits_1_naming_a_model_that_failed(recorded_compare, monkeypatch, capsys):
    """ A model whose step failed (compare's `error` column) leaves the others' tables written, and the exit status
    and stderr say what failed. """
    import timm_hybrid.compare as compare

    def compare_models(names, **kw):
        return [dict(model=n, error='train step: OutOfMemoryError: CUDA out of memory') if n == 'cnt_s_patch16_224'
                else dict(model=n) for n in names]
    monkeypatch.setattr(compare, 'compare_models', compare_models)
    assert main(['compare']) == 1
    assert 'failed: cnt_s_patch16_224 (train step: OutOfMemoryError: CUDA out of memory)' in capsys.readouterr().err
