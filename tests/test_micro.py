""" The Fashion-MNIST micro models (issue #14) and the study's bookkeeping (benchmarks/study_lib.py). """
import itertools
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.models.tnt import TNT

import timm_hybrid
from timm_hybrid.data import FASHION_MNIST_INPUT_SIZE, FASHION_MNIST_LABEL_NAMES, FASHION_MNIST_MEAN

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
import fmnist_micro_study  # noqa: E402
import study_lib  # noqa: E402

TRIO = ('cnt_micro_patch4_28', 'tnt_micro_patch4_28', 'deit_micro_patch4_28')
DISTILLED = ('cnt_micro_distilled_patch4_28', 'deit_micro_distilled_patch4_28')
GRID_MODELS = ('cnt_micro_patch4_28', 'cnt_micro_distilled_patch4_28', 'tnt_micro_patch4_28')


@pytest.fixture(scope='module')
def counts():
    return {name: timm_hybrid.count_flops(name, input_size=FASHION_MNIST_INPUT_SIZE) for name in TRIO + DISTILLED}


@pytest.mark.parametrize('group', [TRIO, DISTILLED], ids=['trio', 'distilled'])
def test_micro_models_are_matched_in_gmacs_and_params(counts, group):
    for a, b in itertools.combinations(group, 2):
        assert counts[a].gmacs == pytest.approx(counts[b].gmacs, rel=0.03), (a, b)
        assert counts[a].mparams == pytest.approx(counts[b].mparams, rel=0.10), (a, b)


@pytest.mark.parametrize('name', TRIO + DISTILLED)
def test_micro_model_has_49_patch_tokens_and_fashion_mnist_cfg(name):
    model = timm.create_model(name).eval()
    embed = getattr(model, 'patch_embed', None) or model.pixel_embed
    assert embed.num_patches == 49
    assert model.pretrained_cfg['input_size'] == FASHION_MNIST_INPUT_SIZE
    assert model.pretrained_cfg['mean'] == FASHION_MNIST_MEAN
    assert tuple(model.pretrained_cfg['label_names']) == FASHION_MNIST_LABEL_NAMES
    assert model(torch.randn(2, *FASHION_MNIST_INPUT_SIZE)).shape == (2, 10)


def _pixel_embeddings(model, x):
    """ (B, 49, 4, 4, C) pixel embeddings of CNT's or timm TNT's pixel embedding. """
    if isinstance(model, TNT):  # (B*N, h*w, C), the pixel position encoding added inside, row-major pixels
        assert model.pixel_embed.new_patch_size == [4, 4]
        out = model.pixel_embed(x, torch.zeros_like(model.pixel_pos)).unflatten(1, (4, 4))
    else:  # (B*N, C, h, w)
        out = model.pixel_embed(x).permute(0, 2, 3, 1)
    return out.reshape(x.shape[0], 49, *out.shape[1:])


@pytest.mark.parametrize('name', GRID_MODELS)
def test_each_patch_has_a_4x4_grid_made_from_its_own_pixels(name):
    model = timm.create_model(name).eval()
    x = torch.randn(1, *FASHION_MNIST_INPUT_SIZE)
    with torch.no_grad():
        before = _pixel_embeddings(model, x)
        assert before.shape[2:4] == (4, 4)
        # pixel (row 9, col 14) lies in patch (2, 3) = token 17; changing it changes only that patch's grid, at
        # the pixel and its neighbours (stride 1: one pixel embedding per image pixel)
        x[0, 0, 9, 14] += 1.
        changed = (_pixel_embeddings(model, x) - before).abs().amax(dim=-1)[0] > 0  # (49, 4, 4)
    assert changed.any(dim=(1, 2)).nonzero().flatten().tolist() == [17]
    assert changed[17, 1, 2]


# --- study bookkeeping -----------------------------------------------------------------------------------------------

def test_summary_of_a_resumed_run_keeps_the_last_row_of_each_epoch(tmp_path):
    path = tmp_path / 'summary.csv'
    path.write_text('epoch,eval_top1\n0,50.0\n1,60.0\nepoch,eval_top1\n1,61.0\n2,70.0\n')
    assert [(r['epoch'], r['eval_top1']) for r in study_lib.read_summary(path)] == [
        ('0', '50.0'), ('1', '61.0'), ('2', '70.0')]


def test_change_over_last_tenth_of_epochs():
    curve = [(e, float(e)) for e in range(2, 101, 2)]  # evaluated every 2nd epoch, +1 per epoch
    assert study_lib.change_over_last_tenth(curve) == 10.0  # epoch 100 vs epoch 90
    assert study_lib.change_over_last_tenth([(100, 80.)]) is None


def test_seconds_to_reach_a_target():
    curve = [(2, 70.), (4, 80.), (6, 79.), (8, 85.)]
    assert study_lib.seconds_to_reach(curve, 80., sec_per_epoch=10.) == 40.
    assert study_lib.seconds_to_reach(curve, 90., sec_per_epoch=10.) is None


def test_time_to_deit_has_a_row_per_group_in_which_deit_ran(monkeypatch):
    curves = {'deit-a': [(1, 80.), (2, 90.)], 'cnt-a': [(1, 85.), (2, 91.)],
              'deit-b': [(1, 88.), (2, 92.)], 'cnt-b': [(1, 92.5), (2, 93.)], 'cnt-c': [(1, 99.)]}
    monkeypatch.setattr(fmnist_micro_study, 'read_curve', lambda study, run: curves[run])
    models = fmnist_micro_study.MODELS

    def row(run, family):
        return {'run': run, 'model': models[family], 'data': '100pct', 'top1_val': str(curves[run][-1][1])}

    speed = {models['deit']: 55000 / 10., models['cnt']: 55000 / 20.}  # 10 and 20 s an epoch on 100%
    lines = fmnist_micro_study._time_to_deit([
        ('100pct', '100pct', [row('deit-a', 'deit'), row('cnt-a', 'cnt')]),
        ('100pct, long', '100pct', [row('deit-b', 'deit'), row('cnt-b', 'cnt')]),
        ('no deit', '100pct', [row('cnt-c', 'cnt')])], speed)
    table = [line for line in '\n'.join(lines).splitlines() if line.startswith('| 100pct')]
    # DeiT reaches its own final accuracy at its last epoch; CNT reaches 90 at epoch 2 and 92 at epoch 1
    assert table == ['| 100pct | 90.00 | 20 s (1/1 seeds) | 40 s (1/1 seeds) | - |',
                     '| 100pct, long | 92.00 | 20 s (1/1 seeds) | 20 s (1/1 seeds) | - |']
    assert not any('no deit' in line for line in lines)


def test_train_throughput_reads_a_compare_csv(tmp_path):
    path = tmp_path / 'compare.csv'
    path.write_text('model,train_samples_per_sec,infer_samples_per_sec\ncnt_micro_patch4_28,330.5,900\n'
                    'tnt_micro_patch4_28,,800\n')
    assert study_lib.train_throughput(path) == {'cnt_micro_patch4_28': 330.5}
    path.write_text('model,train_img_s\ndeit_micro_patch4_28,470\n')  # compare's CSVs before timm's column names
    assert study_lib.train_throughput(path) == {'deit_micro_patch4_28': 470.}


def test_mean_std_over_seeds():
    assert study_lib.mean_std([80., 82., 84.]) == '82.00 ± 2.00 (n=3)'
    assert study_lib.mean_std([80.]) == '80.00 (n=1)'
    assert study_lib.mean_std([]) == '-'


def test_train_log_throughput_takes_each_epochs_last_line(tmp_path):
    log = tmp_path / 'log.txt'
    log.write_text(
        'Train: 0 [   0/42 (  2%)]  Loss: 2.3 (2.3)  Time: 0.5s,  250.00/s  (0.5s,  250.00/s)  LR: 1e-4\n'
        'Train: 0 [  41/42 (100%)]  Loss: 2.0 (2.1)  Time: 0.4s,  320.00/s  (0.4s,  300.00/s)  LR: 1e-4\n'
        'Train: 1 [  41/42 (100%)]  Loss: 1.9 (1.9)  Time: 0.4s,  330.00/s  (0.4s,  310.00/s)  LR: 2e-4\n'
        'Train: 2 [  41/42 (100%)]  Loss: 1.8 (1.8)  Time: 0.4s,  330.00/s  (0.4s,  340.00/s)  LR: 3e-4\n')
    assert study_lib.train_images_per_second(log) == 310.0


def test_shown_command_is_typed_form_without_resume():
    cmd = [sys.executable, '/s/train.py', '--model', 'x', '--resume', '/w/last.pth.tar', '--seed', '1']
    assert study_lib.shown_command(cmd, Path('/s')) == 'python train.py --model x --seed 1'


def test_micro_study_plan_runs_the_most_informative_first():
    runs = fmnist_micro_study.planned_runs()
    names = [r.name for r in runs]
    assert len(set(names)) == len(names)
    assert names[:6] == ['deit-10pct-s0', 'cnt-10pct-s0', 'tnt-10pct-s0', 'deit-1pct-s0', 'cnt-1pct-s0', 'tnt-1pct-s0']
    groups = [r.group for r in runs]
    assert groups == sorted(groups, key=['main', 'teacher', 'distill', 'ablation', 'long', 'option'].index)
    # the winning 10% ablation on the other fractions, against the default CNT of the same seeds
    option = [r for r in runs if r.group == 'option']
    assert [(r.data, r.seed) for r in option] == [(d, s) for d in ('1pct', '100pct') for s in (0, 1, 2)]
    assert {(r.model, r.model_kwargs) for r in option} == {('cnt_micro_patch4_28', ('embed_dim=52', 'inner_dim=8'))}
    assert {r.epochs for r in option if r.data == '100pct'} == {40}
    long = [r for r in runs if r.group == 'long']
    assert [(r.model, r.data, r.epochs) for r in long] == [
        ('cnt_micro_patch4_28', '100pct', 120), ('deit_micro_patch4_28', '100pct', 120),
        ('tnt_micro_patch4_28', '100pct', 120)]
    main = [r for r in runs if r.group == 'main']
    assert [r.data for r in main][-9:] == ['100pct'] * 9 and len(main) == 27
    assert {(r.model, r.seed) for r in main if r.data == '1pct'} == {
        (m, s) for m in fmnist_micro_study.MODELS.values() for s in (0, 1, 2)}
    assert all(r.distill and r.model.endswith('_distilled_patch4_28') or not r.distill for r in runs)


def test_micro_study_trains_on_validation_and_tests_once(tmp_path, monkeypatch):
    run = fmnist_micro_study.planned_runs()[0]
    monkeypatch.setattr(fmnist_micro_study, 'data_root', lambda data, split: tmp_path / f'{data}-{split}')
    study = study_lib.Study(results=tmp_path, work=tmp_path, recipe=fmnist_micro_study.RECIPE, fields=(),
                            data_root=fmnist_micro_study.data_root)
    train = study_lib.train_command(study, run, Path('/s/train.py'))
    assert train[train.index('--data-dir') + 1] == str(tmp_path / '10pct-validation')
    assert train[train.index('--val-split') + 1] == 'test'  # the layout's test files: the validation split
    test = fmnist_micro_study.test_command(run, Path('/s/validate.py'))
    assert test[test.index('--data-dir') + 1] == str(tmp_path / '10pct-test')
    assert test[test.index('--checkpoint') + 1].endswith(f'{run.name}/last.pth.tar')


def test_an_unfinished_run_is_carried_to_the_next_machine_and_dropped_once_recorded(tmp_path):
    """ `carry`: the work dir's unfinished run (checkpoint, curve, log) is copied with the results; a fresh work dir
    (the next machine) gets it back before train.py resumes; a further-on work dir replaces the copy, an earlier one
    does not; a recorded run's copy goes. """
    def study(work):
        return study_lib.Study(results=tmp_path / 'results', work=tmp_path / work, recipe='', fields=('run',),
                               data_root=lambda data, split: tmp_path)

    def write_run(s, run, last_epoch):
        d = s.run_dir(run)
        d.mkdir(parents=True, exist_ok=True)
        (d / 'last.pth.tar').write_bytes(f'checkpoint of epoch {last_epoch}'.encode())
        (d / 'summary.csv').write_text('epoch,eval_top1\n' + ''.join(f'{e},{50 + e}\n' for e in range(last_epoch + 1)))

    run, other = study_lib.Run('a-10pct-s0', 'main', 'm', '10pct'), study_lib.Run('b-10pct-s0', 'main', 'm', '10pct')
    first = study('machine1')
    write_run(first, run, 4)
    assert study_lib.carry_unfinished(first, [run, other]) == ['a-10pct-s0']  # `other` has no checkpoint: nothing
    kept = first.carried / run.name
    assert (kept / 'last.pth.tar').read_bytes() == b'checkpoint of epoch 4'

    second = study('machine2')
    study_lib.restore_carried(second, run)
    assert study_lib.epochs_done(second, run) == 5
    assert (second.run_dir(run) / 'last.pth.tar').read_bytes() == b'checkpoint of epoch 4'
    assert study_lib.carry_unfinished(second, [run]) == []  # no further on than the kept copy
    write_run(second, run, 7)
    assert study_lib.carry_unfinished(second, [run]) == ['a-10pct-s0']
    assert study_lib.carry_unfinished(first, [run]) == []  # machine 1 is behind: the copy stays at epoch 7
    assert (kept / 'last.pth.tar').read_bytes() == b'checkpoint of epoch 7'

    study_lib.append_row(second.runs_csv, ('run',), {'run': run.name})
    study_lib.carry_unfinished(second, [run])
    assert not kept.exists()


def test_a_finished_runs_final_weights_are_kept_as_they_were_tested(tmp_path):
    """ The weights kept with the results are the last checkpoint's model state (what validate.py measured), with
    the run named in the file's metadata; only full-data and distillation runs keep theirs. """
    from safetensors import safe_open
    study = study_lib.Study(results=tmp_path / 'results', work=tmp_path / 'work', recipe='', fields=('run',),
                            data_root=lambda data, split: tmp_path)
    run = study_lib.Run('cnt-100pct-s0', 'main', 'cnt_micro_patch4_28', '100pct', 0, 40)
    assert study_lib.keep_final_weights(study, run) is None  # trained on another machine: nothing to keep
    model = timm.create_model('cnt_micro_patch4_28')
    study.run_dir(run).mkdir(parents=True)
    torch.save({'epoch': 39, 'state_dict': model.state_dict(), 'optimizer': {}}, study.run_dir(run) / 'last.pth.tar')
    path = study_lib.keep_final_weights(study, run)
    with safe_open(path, 'pt') as f:
        assert f.metadata()['run'] == 'cnt-100pct-s0'
        kept = {k: f.get_tensor(k) for k in f.keys()}
    assert kept.keys() == model.state_dict().keys()
    torch.testing.assert_close(kept, model.state_dict(), rtol=0, atol=0)
    assert fmnist_micro_study.keeps_weights(run)
    distill = [r for r in fmnist_micro_study.planned_runs() if r.group == 'distill']
    assert distill and all(fmnist_micro_study.keeps_weights(r) for r in distill)
    assert not fmnist_micro_study.keeps_weights(study_lib.Run('cnt-10pct-s0', 'main', 'm', '10pct'))


def test_publish_ships_the_best_validation_run_whose_folder_reproduces_its_card_and_refuses_a_mismatch(
        tmp_path, monkeypatch):
    """ `publish`: among the full-data runs with kept weights, the best by validation top-1 (not by test) becomes
    <arch>.fmnist; the folder loads those weights, its card reports what timm's evaluator measures on the folder and
    shows the run's curves; a recorded test top-1 the folder does not reproduce leaves the published folder as it
    was. """
    import csv
    import dataclasses
    from safetensors.torch import save_file
    from timm_hybrid.data import DEBIAN_FASHION_MNIST_DIR, evaluate_fashion_mnist, prepare_fashion_mnist
    from timm_hybrid.hub import card_accuracy
    from timm_hybrid.models import baselines
    if not DEBIAN_FASHION_MNIST_DIR.exists():
        pytest.skip('Debian dataset-fashion-mnist not installed')
    root = tmp_path / 'fm'
    prepare_fashion_mnist(root)
    study = dataclasses.replace(fmnist_micro_study.STUDY, results=tmp_path / 'results', work=tmp_path / 'work')
    monkeypatch.setattr(fmnist_micro_study, 'STUDY', study)
    monkeypatch.setattr(fmnist_micro_study, 'data_root', lambda data, split: root)
    monkeypatch.setattr(baselines, 'PACKAGED_WEIGHTS_DIR', tmp_path / 'weights')
    study.weights.mkdir(parents=True)
    torch.manual_seed(0)
    models, test_top1 = {}, {}
    # (run, data, validation top-1): the 10% run has the best validation top-1 but is not a full-data candidate
    for name, data, val in (('cnt-100pct-s0', '100pct', 50.), ('cnt-100pct-s1', '100pct', 60.),
                            ('cnt-10pct-s0', '10pct', 70.)):
        model = models[name] = timm.create_model('cnt_micro_patch4_28').eval()
        save_file(model.state_dict(), str(study.weights_file(name)))
        # a real measurement only where it is checked (a 10000-image pass costs ~15 s)
        test_top1[name] = round(evaluate_fashion_mnist(model, root)['top1'], 2) if name == 'cnt-100pct-s1' else 10.
        study_lib.write_rows(study.curves / f'{name}.csv', [
            dict(epoch=e, train_loss=2. - e / 10, eval_top1=val - 2 + e) for e in range(2)])
        study_lib.append_row(study.runs_csv, fmnist_micro_study.FIELDS, dict(
            run=name, group='main', model='cnt_micro_patch4_28', data=data, seed=name[-1], epochs=2, top1_val=val,
            top1_test=test_top1[name], gmacs=0.01352, params_m=0.2265, command='python train.py --model cnt'))

    lines = fmnist_micro_study.publish()
    folder = tmp_path / 'weights' / 'cnt_micro_patch4_28.fmnist'
    assert any(line.startswith(f'{folder}: run cnt-100pct-s1 ') for line in lines), lines
    assert 'tnt_micro_patch4_28: no candidate run with kept weights yet' in lines
    shipped = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    x = torch.randn(2, *FASHION_MNIST_INPUT_SIZE)
    with torch.no_grad():
        assert torch.equal(shipped(x), models['cnt-100pct-s1'](x))
    assert card_accuracy(folder / 'README.md')['top1'] == pytest.approx(test_top1['cnt-100pct-s1'], abs=0.01)
    card = (folder / 'README.md').read_text()
    assert '](curves.png)' in card and (folder / 'curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

    with open(study.runs_csv) as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        if row['run'] == 'cnt-100pct-s1':
            row['top1_test'] = test_top1['cnt-100pct-s1'] + 1.
    study_lib.write_rows(study.runs_csv, rows)
    with pytest.raises(RuntimeError, match='more than 0.1 pt from the recorded'):
        fmnist_micro_study.publish()
    assert (folder / 'README.md').read_text() == card


def test_students_are_set_against_the_teacher_per_distillation_mode():
    rows = [dict(run=fmnist_micro_study.TEACHER_RUN.name, top1_test='88.00', gmacs='0.04')]
    distill = [dict(run=f'cnt_distilled-10pct-s{seed}-{mode or "nodistill"}', model='cnt_micro_distilled_patch4_28',
                    distill=mode, seed=str(seed), top1_test=str(top1), gmacs='0.01')
               for seed, mode, top1 in ((0, '', 85.), (1, '', 86.), (0, 'hard', 87.5))]
    lines = fmnist_micro_study.students_vs_teacher(distill, rows + distill)
    assert lines[0].startswith('Students against the teacher (resnet18, test top-1 88.00, 0.04 GMACs)')
    table = lines[-1].splitlines()
    assert table[-2].endswith('| none | 0 1 | 85.50 ± 0.71 (n=2) | -2.50 | 0.25 |')
    assert table[-1].endswith('| hard | 0 | 87.50 (n=1) | -0.50 | 0.25 |')
    assert fmnist_micro_study.students_vs_teacher(distill, distill) == []  # no teacher run recorded: no table
