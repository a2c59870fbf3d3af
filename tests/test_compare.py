""" timm_hybrid.compare: settings, threads, spread, token counts, the one result writer, AMP / channels-last steps. """
import csv
import json
import os
import sys
from pathlib import Path

import pytest
import timm
import torch

import timm_hybrid.compare as compare
from timm_hybrid.compare import SpeedSettings, Timing


@pytest.mark.parametrize('cores, load, torch_threads, expected', [
    (2, 1.6, 2, 1),  # another job holds most of one core: one thread, never zero
    (2, 0.1, 2, 2),
    (8, 3.2, 8, 5),
    (8, 0.0, 4, 4),  # never more than torch would use
    (2, 7.0, 2, 1),
])
def test_free_cpu_threads_capped_by_load(cores, load, torch_threads, expected, monkeypatch):
    monkeypatch.setattr(compare.os, 'sched_getaffinity', lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(compare.os, 'getloadavg', lambda: (load, load, load))
    monkeypatch.setattr(torch, 'get_num_threads', lambda: torch_threads)
    assert compare.free_cpu_threads() == expected


def test_spread_covers_every_repeat():
    """ One slow round in five shows: an inter-quartile spread would report 0. """
    t = Timing([1., 1., 1., 1., 2.])
    assert t.median == 1. and t.spread == 0.5
    assert Timing([2., 2.]).spread == 0.


def test_settings_defaults_and_validation():
    quick, full = SpeedSettings.defaults(), SpeedSettings.defaults(full=True, threads=3)
    assert (quick.batch_size, quick.repeats, full.batch_size, full.repeats, full.threads) == (8, 3, 32, 7, 3)
    assert SpeedSettings.defaults(compile=True).warmup == 2
    with pytest.raises(ValueError, match='amp'):
        SpeedSettings(amp='int8')
    with pytest.raises(ValueError, match='>= 1'):
        SpeedSettings(repeats=0)
    with pytest.raises(ValueError, match='settle_steps'):
        SpeedSettings(settle_steps=-1)
    with pytest.raises(ValueError, match="malloc must be one of"):
        SpeedSettings(malloc='never')
    text = SpeedSettings(threads=2, batch_size=4, repeats=5, amp='bf16').describe()
    assert 'threads=2, batch_size=4, repeats=5' in text and 'amp=bf16' in text and 'malloc=default' in text
    assert '1 untimed step(s) of the same model before each timed one' in text


_REMAKE_FAULTS = """
import sys, torch
from timm_hybrid.compare import SpeedSettings, minor_faults

def faults_of_remaking():
    torch.empty(2 ** 24).fill_(1.)  # 64 MiB made and freed
    start = minor_faults()
    torch.empty(2 ** 24).fill_(1.)  # and made again
    return minor_faults() - start

before = faults_of_remaking()
SpeedSettings(malloc=sys.argv[1]).apply_malloc()
faults_of_remaking()  # the first block after the change is new to the heap
print(before, faults_of_remaking())
"""


@pytest.mark.skipif(compare.glibc_function('mallopt') is None, reason="glibc's malloc only")
@pytest.mark.parametrize('malloc', ['default', 'keep'])
def test_malloc_keep_stops_each_step_faulting_its_tensors_in_anew(malloc):
    """ A 64 MiB tensor made again after it was freed: with glibc's defaults above its mmap threshold, so a fresh
    mapping whose pages fault in again (16384 of 4 KiB here; fewer where transparent huge pages back it); with
    malloc='keep' from the heap, where its pages already are. In a fresh process: the setting lasts for the rest of
    the process. """
    import subprocess
    out = subprocess.run([sys.executable, '-c', _REMAKE_FAULTS, malloc], capture_output=True, text=True, check=True)
    before, after = map(int, out.stdout.split())
    assert before > 0
    if malloc == 'default':
        assert after * 2 > before
    else:
        assert after * 10 < before


@pytest.mark.parametrize('settle_steps', [0, 1, 2])
def test_each_timed_step_follows_untimed_steps_of_the_same_model(settle_steps):
    """ Rounds rotate the models; within a round each model runs `settle_steps` untimed steps, then its timed one,
    so a timed step never follows another model's step (unless settle_steps=0). """
    calls = []
    models = {n: torch.nn.Linear(3, 2) for n in 'abc'}
    for n, m in models.items():
        m.register_forward_hook(lambda *_, n=n: calls.append(n))
    settings = SpeedSettings(batch_size=2, repeats=3, warmup=1, settle_steps=settle_steps)
    timings = compare.time_interleaved(models, {n: (3,) for n in models}, settings)
    assert {n: len(t.seconds) for n, t in timings.items()} == {n: 3 for n in models}
    per_round = 3 * (1 + settle_steps)
    rounds = [calls[3 + i * per_round:3 + (i + 1) * per_round] for i in range(3)]  # after the warm-up a, b, c
    assert calls[:3] == ['a', 'b', 'c'] and len(calls) == 3 + 3 * per_round
    assert rounds == [[n for n in order for _ in range(1 + settle_steps)] for order in ('abc', 'bca', 'cab')]


def test_timed_steps_count_the_page_faults_they_take(monkeypatch):
    """ Each timed step's faults, not its settling steps' or the other models': here each forward of `a` takes 100
    faults and each of `b` 1 (a fake counter). """
    taken = [0]
    monkeypatch.setattr(compare, 'minor_faults', lambda: taken[0])

    class Faulting(torch.nn.Linear):
        def __init__(self, faults: int):
            super().__init__(3, 2)
            self.faults = faults

        def forward(self, x):
            taken[0] += self.faults
            return super().forward(x)

    models = {'a': Faulting(100), 'b': Faulting(1)}
    settings = SpeedSettings(batch_size=2, repeats=3, warmup=1, settle_steps=2)
    timings = compare.time_interleaved(models, {n: (3,) for n in models}, settings, train=True)
    assert timings['a'].faults == [100] * 3 and timings['b'].faults == [1] * 3


@pytest.mark.parametrize('name, kwargs, tokens', [
    ('deit_small_patch16_224', dict(img_size=288), 18 * 18),
    ('cnt_nano_patch7_28', dict(img_size=56), 8 * 8),  # patch 7, not 16
    ('tnt_nano_patch7_28', {}, 4 * 4),
    ('hatnet_tiny', {}, None),  # hierarchical: no single token grid
])
def test_num_patch_tokens_from_the_model(name, kwargs, tokens):
    assert compare.num_patch_tokens(timm.create_model(name, **kwargs)) == tokens


def test_write_results_one_writer_for_csv_markdown_json(tmp_path):
    rows = [dict(model='a', infer_gmacs=1.5), dict(model='b', infer_gmacs=2., infer_samples_per_sec=10.)]
    stem = compare.write_results(rows, tmp_path / 'out', 'table', dict(settings='threads=1'), title='A title')
    assert stem == tmp_path / 'out' / 'table'
    with open(tmp_path / 'out' / 'table.csv') as f:
        read = list(csv.DictReader(f))
    assert list(read[0]) == ['model', 'infer_gmacs', 'infer_samples_per_sec']  # union of the rows' keys, in order
    assert read[0]['infer_samples_per_sec'] == '' and read[1]['infer_samples_per_sec'] == '10.0'
    md = (tmp_path / 'out' / 'table.md').read_text()
    assert md.startswith('# A title\n') and 'Settings: threads=1' in md
    assert '| a | 1.5 |  |' in md
    assert json.loads((tmp_path / 'out' / 'table.json').read_text()) == dict(meta=dict(settings='threads=1'), rows=rows)


@pytest.mark.parametrize('amp, channels_last', [('bf16', False), (None, True)])
def test_amp_and_channels_last_steps_run(amp, channels_last, tmp_path):
    """ Inference and a training step under autocast / in channels-last: the model's parameters change (the
    optimizer stepped) and the timing has one entry per repeat. """
    settings = SpeedSettings(batch_size=2, repeats=2, amp=amp, channels_last=channels_last)
    model = compare.prepare_model(timm.create_model('cnt_nano_patch7_28'), settings)
    before = model.head.weight.detach().clone()
    timings = compare.time_interleaved({'m': model}, {'m': (1, 28, 28)}, settings, train=True)
    assert len(timings['m'].seconds) == 2
    assert not torch.equal(before, model.head.weight)
    infer = compare.make_step(model, (1, 28, 28), settings)
    infer()
    assert not model.training


def test_compare_models_params_and_gmacs_only(tmp_path):
    rows = compare.compare_models(['cnt_nano_patch7_28'], output_dir=tmp_path, speed=False)
    assert rows == [dict(model='cnt_nano_patch7_28', infer_img_size=28, param_count=0.368, infer_gmacs=0.00825)]
    assert 'params and GMACs only' in (tmp_path / 'compare.md').read_text()


@pytest.mark.parametrize('spec, parsed', [
    ('cnt_nano_patch7_28', ('cnt_nano_patch7_28', {})),
    ('cnt_nano_patch7_28:inner_impl=matmul,recompute_pixels=False',
     ('cnt_nano_patch7_28', {'inner_impl': 'matmul', 'recompute_pixels': False})),
    ('cnt_nano_patch7_28:img_size=(28, 56), depth=2', ('cnt_nano_patch7_28', {'img_size': (28, 56), 'depth': 2})),
])
def test_parse_model_spec(spec, parsed):
    assert compare.parse_model_spec(spec) == parsed


@pytest.mark.parametrize('spec, message', [
    ('cnt_nano_patch7_28:depth', "expected name:key=value"),
    ('cnt_nano_patch7_28:nosuch=1', "unexpected keyword argument 'nosuch'"),
    ('cnt_nano_patch7_28:inner_impl=nosuch', "Unknown inner_impl 'nosuch'"),
    ('cnt_nano_patch7_28:recompute_pixels=cpu,global_pool=None', r'drops kwargs whose value is None \(global_pool\)'),
])
def test_bad_model_spec_says_which(spec, message):
    with pytest.raises(compare.ModelSpecError, match=message) as e:
        compare.create_model_spec(spec)
    assert spec in str(e.value)


def test_model_spec_variants_time_side_by_side(tmp_path, monkeypatch):
    """ A spec builds the model with its kwargs (depth 2, fewer blocks than registered: fewer params and GMACs),
    keeps the spec as the row's model, and can be a reference with its own ratio columns. On CPU each row has the
    page faults of its timed steps (here a fault counter that moves by 5 a reading). """
    readings = iter(range(0, 10 ** 6, 5))
    monkeypatch.setattr(compare, 'minor_faults', lambda: next(readings))
    variant = 'cnt_nano_patch7_28:depth=2'
    rows = compare.compare_models(
        ['cnt_nano_patch7_28', variant], output_dir=tmp_path, references=[variant], memory=False,
        settings=SpeedSettings(batch_size=2, repeats=1, warmup=0))
    by_model = {r['model']: r for r in rows}
    assert set(by_model) == {'cnt_nano_patch7_28', variant}
    assert by_model[variant]['infer_gmacs'] < by_model['cnt_nano_patch7_28']['infer_gmacs']
    assert by_model[variant]['param_count'] < by_model['cnt_nano_patch7_28']['param_count']
    assert by_model[variant]['infer_x_cnt_nano_depth_2'] == 1.0
    assert 'infer_x_cnt_nano_depth_2' in by_model['cnt_nano_patch7_28']
    assert {(r['infer_faults_per_step'], r['train_faults_per_step']) for r in rows} == {(5, 5)}
    # the host is named in every output: ratios move with it
    meta = json.loads((tmp_path / 'compare.json').read_text())['meta']
    assert meta['processor'] == compare.processor_name(SpeedSettings())
    assert f"processor: {meta['processor']}" in (tmp_path / 'compare.md').read_text()


def test_processor_name_falls_back_to_platform(tmp_path, monkeypatch):
    """ The CPU's model name from cpuinfo; without one (not Linux) `platform.processor()`, else 'unknown'; then the
    vector instructions of aten's kernels. """
    monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda: 'AVX2')
    cpuinfo = tmp_path / 'cpuinfo'
    cpuinfo.write_text('processor\t: 0\nmodel name\t: Some CPU @ 2.0GHz\nflags\t: avx\n')
    assert compare.processor_name(SpeedSettings(), str(cpuinfo)) == 'Some CPU @ 2.0GHz (aten: AVX2)'
    missing = str(tmp_path / 'missing')
    monkeypatch.setattr(compare.platform, 'processor', lambda: 'arm')
    assert compare.processor_name(SpeedSettings(), missing) == 'arm (aten: AVX2)'
    monkeypatch.setattr(compare.platform, 'processor', lambda: '')
    assert compare.processor_name(SpeedSettings(), missing) == 'unknown (aten: AVX2)'


def test_resolution_sweep_counts_tokens_from_the_model(tmp_path):
    """ A patch-7 model: 16 tokens at 28 px, 64 at 56 px (`res // 16` would say 1 and 9). """
    settings = SpeedSettings(batch_size=2, repeats=1)
    rows = compare.resolution_sweep(['cnt_nano_patch7_28'], resolutions=(28, 56), output_dir=tmp_path,
                                    settings=settings)
    assert [(r['infer_img_size'], r['tokens']) for r in rows] == [(28, 16), (56, 64)]
    assert rows[1]['infer_gmacs'] > 3 * rows[0]['infer_gmacs']
    assert {p.name for p in tmp_path.iterdir()} == {f'resolution.{s}' for s in ('csv', 'md', 'json', 'png')}


def test_device_benchmark_times_the_gpu_only_choices_against_their_alternatives_on_a_gpu():
    """ benchmarks/device_benchmark.py: on a GPU the S group adds the alternatives of the settings the models choose
    there (CNT's GEMM inner block and kept MLP activations, Refiner's per-image BatchNorm statistics); on a CPU it
    does not. """
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
    import device_benchmark
    cpu = device_benchmark.size_groups(['ti', 's'], on_gpu=False)
    gpu = device_benchmark.size_groups(['ti', 's'], on_gpu=True)
    assert cpu == {s: device_benchmark.SIZE_GROUPS[s] for s in ('ti', 's')}
    assert gpu['ti'] == cpu['ti'] and gpu['s'][1] == 'deit_small_patch16_224'
    added = gpu['s'][0][len(cpu['s'][0]):]
    assert gpu['s'][0][:len(cpu['s'][0])] == cpu['s'][0] and len(added) == 3
    cnt_conv, cnt_recompute, refiner = (compare.create_model_spec(spec) for spec in added)
    assert {blk.inner.impl for blk in cnt_conv.blocks} == {'conv'}
    assert {blk.outer.mlp.recompute_act for blk in cnt_recompute.blocks} == {True}
    assert {blk.attn.refine.image_stats for blk, r in zip(refiner.blocks, refiner.refiner_blocks) if r} == {False}


def test_profile_step_ranks_ops_by_self_time_and_device_benchmark_writes_them(tmp_path):
    """ benchmarks/profile_step.py: one training step's ops (no duplicates of one op and shape), largest self time
    first, shares of the whole step. On CPU timed at dispatch (backward's ops too), with each op's page faults; the
    ops' times add up to no more than the counted step's. With `torch_profiler`, under torch.profiler.
    `write_profile` names the files after the model spec. """
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
    import profile_step
    for torch_profiler in (False, True):
        table, meta = profile_step.profile_step(
            'cnt_nano_patch7_28:depth=2', SpeedSettings(batch_size=2), train=True, rows=8, warmup=1,
            torch_profiler=torch_profiler)
        assert len(table) == 8
        times = [r['self_ms'] for r in table]
        assert times == sorted(times, reverse=True) and times[0] > 0
        assert len({(r['op'], r['input_shapes']) for r in table}) == 8
        assert any(r['op'].startswith('aten::') for r in table)
        assert 0 < sum(r['self_share'] for r in table) <= 1.001
        assert meta['self_ms_all_ops'] >= sum(times) and 'one step after 1 warm-up' in meta['settings']
        if torch_profiler:
            assert 'torch.profiler' in meta['self_ms'] and 'step_ms' not in meta and 'faults' not in table[0]
        else:
            assert all(r['faults'] >= 0 for r in table)
            assert meta['self_ms_all_ops'] <= meta['step_ms'] and meta['step_ms_uncounted'] > 0
            full, _ = profile_step.count_step('cnt_nano_patch7_28:depth=2', SpeedSettings(batch_size=2), rows=10 ** 6,
                                              warmup=1)
            assert any(r['op'].startswith('aten::convolution_backward') for r in full)
    md = profile_step.write_profile('cnt_nano_patch7_28:depth=2', True, table, meta, tmp_path)
    assert md == tmp_path / 'cnt_nano_patch7_28_depth=2-train.md' and md.is_file()
    assert (tmp_path / 'cnt_nano_patch7_28_depth=2-train.csv').is_file()


def test_profile_step_faults_counts_each_ops_page_faults(tmp_path, monkeypatch):
    """ profile_step.py --faults: one CPU training step's aten ops (backward's too) ranked by the minor page faults
    each took. Here the fault counter is stubbed to count one fault a read, so every op takes exactly one: the table
    then holds each op's calls as its faults, and the step's own count is the ops' plus the two reads around the step.
    GPU steps are refused. """
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
    import itertools
    from types import SimpleNamespace
    import profile_step
    ticks = itertools.count()
    monkeypatch.setattr(profile_step, '_minor_faults', lambda: next(ticks))
    table, meta = profile_step.faults_step(
        'cnt_nano_patch7_28:depth=2', SpeedSettings(batch_size=2), train=True, rows=1000, warmup=1)
    assert all(r['faults'] == r['calls'] for r in table)
    assert meta['faults_all_ops'] == sum(r['calls'] for r in table)
    assert meta['faults_step'] == 2 * meta['faults_all_ops'] + 1  # two reads an op, one more after the step
    ops = {r['op'] for r in table}
    assert any(op.startswith('aten::convolution_backward') for op in ops)  # backward runs under the counter too
    assert any(op.startswith('aten::_foreach') or op.startswith('aten::add') for op in ops)
    md = profile_step.write_profile('cnt_nano_patch7_28:depth=2', True, table, meta, tmp_path, kind='faults')
    assert md == tmp_path / 'cnt_nano_patch7_28_depth=2-train-faults.md' and md.is_file()
    with pytest.raises(ValueError, match='CPU steps only'):  # settings of a GPU step (none needed to refuse it)
        profile_step.faults_step('cnt_nano_patch7_28', SimpleNamespace(on_gpu=True), rows=1)
    with pytest.raises(ValueError, match="rank must be 'self_ms' or 'faults'"):
        profile_step.count_step('cnt_nano_patch7_28', SpeedSettings(batch_size=2), rank='calls')


class _FailsOnCall(torch.nn.Linear):
    """ A model whose `fail_at`-th forward raises what a GPU out of memory raises. """

    def __init__(self, fail_at: int):
        super().__init__(3, 2)
        self.calls, self.fail_at = 0, fail_at

    def forward(self, x):
        self.calls += 1
        if self.calls >= self.fail_at:
            raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 9.00 GiB\nmore lines')
        return super().forward(x)


def test_a_failing_step_leaves_the_rounds_and_the_others_are_timed():
    """ With `failures`, a model whose step raises mid-way (its third call, in the second round) leaves the rounds
    with its error's first line recorded, and the other models get every repeat; without it the error propagates. """
    settings = SpeedSettings(batch_size=2, repeats=3, warmup=1, settle_steps=0)
    models = {'a': torch.nn.Linear(3, 2), 'b': _FailsOnCall(3), 'c': torch.nn.Linear(3, 2)}
    failures = {}
    timings = compare.time_interleaved(models, {n: (3,) for n in models}, settings, train=True, failures=failures)
    assert set(timings) == {'a', 'c'} and all(len(t.seconds) == 3 for t in timings.values())
    assert failures == {'b': 'OutOfMemoryError: CUDA out of memory. Tried to allocate 9.00 GiB'}
    assert all(p.grad is None for p in models['b'].parameters())  # what the failed step left is freed
    with pytest.raises(torch.OutOfMemoryError):
        compare.time_interleaved({'b': _FailsOnCall(1)}, {'b': (3,)}, settings)
    failures = {}  # every model failing: no timings, each error recorded
    assert compare.time_interleaved({'b': _FailsOnCall(1)}, {'b': (3,)}, settings, failures=failures) == {}
    assert list(failures) == ['b']


def test_compare_models_records_a_failed_model_and_goes_on(tmp_path, monkeypatch):
    """ A model whose training step fails keeps its inference columns and gets timm's `error` column, the models
    after it are timed, a peak-memory measurement that fails is an error beside the timings it leaves, and the
    tables and the plot are written. """
    failing, real_create = 'cnt_nano_patch7_28:depth=2', compare.create_model_spec

    def create(spec, **kwargs):
        model = real_create(spec, **kwargs)
        if spec == failing:
            forward = model.forward

            def forward_failing_in_training(x):
                if model.training:
                    raise RuntimeError('CUDA error: an illegal memory access was encountered')
                return forward(x)
            model.forward = forward_failing_in_training
        return model

    def peak_memory_mb(name, settings):
        raise RuntimeError('A process in the process pool was terminated abruptly')
    monkeypatch.setattr(compare, 'create_model_spec', create)
    monkeypatch.setattr(compare, 'peak_memory_mb', peak_memory_mb)
    rows = compare.compare_models(
        [failing, 'cnt_nano_patch7_28'], output_dir=tmp_path, references=['deit_nano_patch7_28'],
        settings=SpeedSettings(batch_size=2, repeats=1, warmup=0))
    by_model = {r['model']: r for r in rows}
    error = 'train step: RuntimeError: CUDA error: an illegal memory access was encountered'
    assert by_model[failing]['error'] == error
    assert 'infer_x_deit_nano' in by_model[failing] and 'train_samples_per_sec' not in by_model[failing]
    good = by_model['cnt_nano_patch7_28']
    assert {'infer_x_deit_nano', 'train_x_deit_nano'} <= set(good) and 'train_peak_mem_mb' not in good
    assert good['error'] == 'memory: RuntimeError: A process in the process pool was terminated abruptly'
    assert 'illegal memory access' in (tmp_path / 'compare.md').read_text()
    assert (tmp_path / 'compare.png').is_file()


def test_device_benchmark_keeps_each_groups_table_and_goes_on_past_failures(tmp_path, monkeypatch):
    """ benchmarks/device_benchmark.py as a lent GPU machine's one call runs it: the combined table is rewritten after
    each size group (a run cut by the lease keeps the groups it finished); `--profile` alone profiles the GPU targets'
    models, one that fails does not stop the next, and the exit status says something failed. """
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
    import device_benchmark
    nano = 'deit_nano_patch7_28'
    monkeypatch.setattr(device_benchmark, 'SIZE_GROUPS', {
        's': (('cnt_nano_patch7_28', nano), nano), 'ti': (('tnt_nano_patch7_28', nano), nano)})
    combined, real_write = [], device_benchmark.write_results

    def write_results(rows, out, stem, *args, **kwargs):
        if stem == 'benchmark':
            combined.append([r['model'] for r in rows])
        return real_write(rows, out, stem, *args, **kwargs)

    profiled = []

    def profile_step(spec, settings, **kwargs):
        profiled.append(spec)
        if spec == 'cnt_s_patch16_224':
            raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')
        return [dict(op='aten::mm', input_shapes='[]', calls=1, self_ms=1., self_share=1.)], dict(settings='')
    monkeypatch.setattr(device_benchmark, 'write_results', write_results)
    monkeypatch.setattr(device_benchmark, 'profile_step', profile_step)
    monkeypatch.setattr(device_benchmark, 'write_profile', lambda spec, *args: tmp_path / f'{spec}.md')
    monkeypatch.setattr(sys, 'argv', ['device_benchmark.py', '--sizes', 's', 'ti', '--batch-size', '2', '--repeats',
                                      '1', '--no-memory', '--output', str(tmp_path), '--profile'])
    assert device_benchmark.main() == 1
    assert combined == [['cnt_nano_patch7_28', nano], ['cnt_nano_patch7_28', nano, 'tnt_nano_patch7_28', nano]]
    assert profiled == list(device_benchmark.PROFILE_TARGETS)
    rows = json.loads((tmp_path / 'benchmark.json').read_text())['rows']
    assert all('infer_x_deit' in r and 'error' not in r for r in rows)


def test_device_run_script_packs_what_the_benchmark_wrote(tmp_path):
    """ benchmarks/device_run.sh, the one call on a lent GPU machine, here on the CPU with a nano model as the stage
    its arguments make: $OUT gets the environment line, the test and benchmark logs and one archive of the tables
    and profile the benchmark wrote (the device tool returns at most 8 files), and the script exits 0. """
    import subprocess
    import tarfile
    repo = Path(__file__).resolve().parents[1]
    out, results = tmp_path / 'out', tmp_path / 'results'
    out.mkdir()
    env = dict(os.environ, OUT=str(out), DEVICE_RESULTS=str(results), DEVICE_WHEELS=str(tmp_path / 'no-wheels'),
               PYTHON=sys.executable)
    run = subprocess.run(
        ['bash', str(repo / 'benchmarks' / 'device_run.sh'), '--models', 'cnt_nano_patch7_28', '--reference',
         'deit_nano_patch7_28', '--batch-size', '2', '--repeats', '1', '--no-memory', '--profile',
         'cnt_nano_patch7_28'], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert {p.name for p in out.iterdir()} == {'env.txt', 'tests.log', 'benchmark.log', 'results.tgz'}
    assert (out / 'env.txt').read_text().startswith(f'torch {torch.__version__}, timm {timm.__version__}')
    assert 'skipped' in (out / 'tests.log').read_text()  # the CUDA tests, without a GPU
    with tarfile.open(out / 'results.tgz') as tar:
        packed = {Path(name).relative_to(str(results).lstrip('/')).as_posix() for name in tar.getnames()}
    assert {'models.csv', 'benchmark.md', 'speed_vs_gmacs.png', 'profile/cnt_nano_patch7_28-train.md'} <= packed


def _memory_traffic():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
    import memory_traffic
    return memory_traffic


def test_memory_traffic_counts_each_ops_bytes_and_flops():
    """ benchmarks/memory_traffic.py's counter: a matmul reads both operands and writes its output (and does
    2 * m * k * n FLOPs), a broadcast operand is read once per element it holds, views move nothing. """
    mt = _memory_traffic()
    a, b, bias = torch.randn(4, 8), torch.randn(8, 16), torch.randn(16)
    with mt.TrafficCounter() as counter:
        y = a @ b
        y.t().reshape(64)  # the transposed view is free; flattening it copies (a clone, then a free view)
        y + bias  # bias broadcast over 4 rows: its 16 values read once
    assert counter.calls == {'mm': 1, 'clone': 1, 'add': 1}
    assert counter.bytes['mm'] == (32 + 128 + 64) * 4 and counter.flops['mm'] == 2 * 4 * 8 * 16
    assert counter.bytes['clone'] == 2 * 64 * 4
    assert counter.bytes['add'] == (64 + 16 + 64) * 4 and counter.flops['add'] == 0
    # a depthwise conv's backward (input and weight gradients) costs twice its forward, groups counted
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    with mt.TrafficCounter() as counter:
        conv(x).sum().backward()
    assert counter.flops['convolution'] == 2 * 2 * 8 * 16 * 16 * 9
    assert counter.flops['convolution_backward'] == 2 * counter.flops['convolution']


def test_memory_traffic_runs_cuda_autocasts_float32_ops_in_float32_and_takes_the_gpu_paths():
    mt = _memory_traffic()
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert x.softmax(-1).dtype == torch.bfloat16  # the CPU's autocast
        with mt.CudaAutocastFp32():
            assert x.softmax(-1).dtype == torch.float32 and torch.nn.functional.layer_norm(x, (8,)).dtype == \
                torch.float32
            assert (x @ x.t()).dtype == torch.bfloat16
    assert mt.gpu_spec('deit_small_patch16_224') == 'deit_small_patch16_224'
    assert mt.gpu_spec('cnt_s_patch16_224:inner_impl=conv') == (
        'cnt_s_patch16_224:inner_impl=conv,recompute_mlp_act=False')
    assert mt.gpu_spec('refiner_vit_small_patch16_224') == (
        'refiner_vit_small_patch16_224:refine_channels_last=True,refine_image_stats=True,cpu_chunk=0')


def test_memory_traffic_flops_match_fvcores_multiply_adds():
    """ A DeiT's inference forward does 2 FLOPs per fvcore multiply-add (within its head and norms' share), a training
    step three times that (forward, and backward's two GEMMs a layer, none for the input image). """
    mt = _memory_traffic()
    from timm_hybrid.flops import count_flops
    model = timm.create_model('deit_nano_patch7_28')
    flops = 2e9 * count_flops(model, input_size=model.pretrained_cfg['input_size']).gmacs * 4
    infer, train = (sum(mt.count_step('deit_nano_patch7_28', 4, amp=False, train=t).flops.values())
                    for t in (False, True))
    assert 0.97 < infer / flops < 1.01 and 2.9 < train / flops < 3.0
    rows = mt.traffic_table(['deit_nano_patch7_28'], 'deit_nano_patch7_28', batch_size=8)
    assert rows[0]['train_x_deit_nano'] == rows[0]['infer_x_deit_nano'] == 1.0
    assert rows[0]['train_roofline_ms'] > rows[0]['infer_roofline_ms'] > 0


def test_memory_traffic_counts_the_kernels_inductor_schedules_for_a_gpu():
    """ `--compiled`'s counter: a GEMM stays an extern kernel (its operands and output, its FLOPs) and the elementwise
    ops after it fuse into one kernel that reads the GEMM's output once and writes once, where eager runs two ops
    that each read and write it. """
    mt = _memory_traffic()
    weight = torch.randn(16, 32)

    def f(x):
        return torch.nn.functional.gelu(x @ weight) + 1
    counter = mt.KernelCounter()
    torch._dynamo.reset()
    with counter.settings():
        out = torch.compile(f, backend=counter.backend, dynamic=False)(x := torch.randn(8, 16))
    torch.testing.assert_close(out, f(x))  # the graph ran (eagerly)
    assert counter.graphs == 1
    assert counter.kernels == [((8 * 16 + 16 * 32 + 8 * 32) * 4, 2 * 8 * 16 * 32, True), (2 * 8 * 32 * 4, 0, False)]
    with mt.TrafficCounter() as eager:
        f(x)
    assert eager.bytes['gelu'] + eager.bytes['add'] == 2 * counter.kernels[1][0]


def test_memory_traffic_compiled_step_counts_forward_backward_and_the_eager_optimizer():
    """ A compiled training step: inductor's forward and backward graphs (the same GEMMs, convolution and attention
    as the eager step, so the same FLOPs: equal here) and the eager AdamW step; the table adds `_compiled` columns
    and the ratios to the reference. Under torch.compile Refiner keeps aten's BatchNorm (no per-image statistics). """
    mt = _memory_traffic()
    kernels, optimizer = mt.compiled_count_step('deit_nano_patch7_28', 4, amp=False, train=True)
    assert kernels.graphs == 2 and optimizer.calls['addcdiv_'] > 0
    eager = mt.count_step('deit_nano_patch7_28', 4, amp=False, train=True)
    compiled_flops = sum(f for _, f, _ in kernels.kernels) + sum(optimizer.flops.values())
    assert compiled_flops == pytest.approx(sum(eager.flops.values()), rel=1e-3)
    inference, none = mt.compiled_count_step('deit_nano_patch7_28', 4, amp=False, train=False)
    assert inference.graphs == 1 and none is None
    assert mt.gpu_spec('refiner_vit_small_patch16_224', compiled=True) == (
        'refiner_vit_small_patch16_224:refine_channels_last=True,cpu_chunk=0')
    row = mt.traffic_table(['deit_nano_patch7_28'], 'deit_nano_patch7_28', batch_size=8, compiled=True)[0]
    assert row['train_x_deit_nano_compiled'] == row['infer_x_deit_nano_compiled'] == 1.0
    assert row['train_roofline_ms_compiled'] > row['infer_roofline_ms_compiled'] > 0
    assert row['train_kernels_compiled'] > row['infer_kernels_compiled'] > 0


def test_memory_traffic_adds_the_measured_steps_and_the_fraction_of_the_floor(tmp_path):
    """ `--measured`: a device_benchmark.py benchmark.json gives each model's step times and floor / measured; a model
    it did not time keeps its row as it was. """
    mt = _memory_traffic()
    measured = tmp_path / 'benchmark.json'
    measured.write_text(json.dumps(dict(meta={}, rows=[dict(model='a', infer_step_time=20., train_step_time=80.)])))
    rows = [dict(model='a', infer_roofline_ms=10., train_roofline_ms=20.), dict(model='b', infer_roofline_ms=1.)]
    mt.add_measured(rows, measured)
    assert rows[0] == dict(model='a', infer_roofline_ms=10., train_roofline_ms=20., infer_step_time=20.,
                           infer_floor_fraction=0.5, train_step_time=80., train_floor_fraction=0.25)
    assert rows[1] == dict(model='b', infer_roofline_ms=1.)
