""" Training timm_hybrid models with timm's own machinery: token distillation, fine-tuning from a checkpoint file,
DistributedDataParallel under torchrun (every family), resuming a killed run from timm's CheckpointSaver. """
import json
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models import adapt_input_conv
from timm.optim import create_optimizer_v2
from timm.task import TokenDistillationTask
from timm.utils import CheckpointSaver

from test_reliability import FAMILIES, image

STUDENT = 'cnt_nano_distilled_patch7_28'


@pytest.mark.parametrize('distill_type', ['soft', 'hard'])
def test_token_distillation_task_trains_cnt_distilled(distill_type):
    student = timm.create_model(STUDENT, depth=2)
    teacher = timm.create_model('deit_nano_patch7_28', depth=1)  # tiny, fixed (random) teacher
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    task = TokenDistillationTask(student, teacher, distill_type=distill_type, temperature=2.0, verbose=False)
    optimizer = create_optimizer_v2(student, 'adamw', lr=2e-3, weight_decay=0.)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))

    task.train()
    history = []
    for _ in range(8):
        result = task(x, y)
        optimizer.zero_grad()
        result['loss'].backward()
        optimizer.step()
        history.append({k: result[k].item() for k in ('loss', 'task_loss', 'distill_loss')})

    assert result['output'].shape == (16, 10)  # the class head's logits, for metrics
    first, last = history[0], history[-1]
    assert last['loss'] < 0.7 * first['loss'], history
    assert last['distill_loss'] < first['distill_loss'] and last['task_loss'] < first['task_loss'], history
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items()), 'teacher changed'
    task.eval()
    with torch.no_grad():
        assert student(x).shape == (16, 10)  # one (averaged) output outside distilled training


def _save(state_dict, path: Path) -> Path:
    torch.save({'epoch': 3, 'state_dict': state_dict}, path)  # timm train.py checkpoint layout
    return path


def _fresh_and_loaded(name: str, checkpoint: Path, **kwargs):
    """ The same model twice from the same seed: freshly initialised, and with `checkpoint` loaded by timm. """
    torch.manual_seed(1)
    fresh = timm.create_model(name, **kwargs)
    torch.manual_seed(1)
    loaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(checkpoint)), **kwargs)
    return fresh.state_dict(), loaded.state_dict()


def test_finetune_from_cnt_checkpoint_to_new_head_channels_and_resolution(tmp_path):
    source = timm.create_model('cnt_nano_patch7_28')
    src = source.state_dict()
    checkpoint = _save(src, tmp_path / 'cnt.pth.tar')
    fresh, loaded = _fresh_and_loaded('cnt_nano_patch7_28', checkpoint, num_classes=5, in_chans=3, img_size=56)

    for k in ('head.weight', 'head.bias'):  # new 5-class head: the fresh init, nothing from the source
        assert loaded[k].shape[0] == 5 and torch.equal(loaded[k], fresh[k])
    # 1 -> 3 input channels by timm's adapt_input_conv; 4x4 -> 8x8 patch grid by resampling the position embedding
    assert torch.equal(loaded['pixel_embed.proj.weight'],
                       adapt_input_conv(3, src['pixel_embed.proj.weight'], base_chans=1))
    assert torch.equal(loaded['patch_pos'],
                       resample_abs_pos_embed(src['patch_pos'], new_size=[8, 8], num_prefix_tokens=1))
    assert src['token_grid'].tolist() == [4, 4] and loaded['token_grid'].tolist() == [8, 8]  # the grid it now has
    adapted = {'head.weight', 'head.bias', 'pixel_embed.proj.weight', 'patch_pos', 'token_grid'}
    assert loaded.keys() == src.keys()
    assert all(torch.equal(loaded[k], src[k]) for k in src if k not in adapted)


def test_finetune_from_deit_checkpoint_takes_outer_blocks(tmp_path):
    # a DeiT as wide and deep as the nano CNT, so its blocks fit CNT's outer transformer
    deit = timm.create_model('deit_nano_patch7_28', embed_dim=64).state_dict()
    checkpoint = _save(deit, tmp_path / 'deit.pth.tar')
    fresh, loaded = _fresh_and_loaded('cnt_nano_patch7_28', checkpoint, num_classes=5)

    for i in range(6):
        for part in ('norm1.weight', 'attn.qkv.weight', 'attn.proj.weight', 'norm2.bias', 'mlp.fc1.weight',
                     'mlp.fc2.bias'):
            assert torch.equal(loaded[f'blocks.{i}.outer.{part}'], deit[f'blocks.{i}.{part}']), (i, part)
    assert torch.equal(loaded['cls_token'], deit['cls_token'])
    assert torch.equal(loaded['patch_pos'], deit['pos_embed'])
    assert torch.equal(loaded['norm.weight'], deit['norm.weight'])
    # what DeiT lacks keeps the fresh init: the pixel stream, the inner conv blocks and the new head
    for k in ('head.weight', 'pixel_embed.proj.weight', 'pixel_pos', 'blocks.0.inner.conv_block.conv1.weight'):
        assert torch.equal(loaded[k], fresh[k]), k


@pytest.fixture(scope='module')
def ddp_run(tmp_path_factory):
    """ One torchrun launch (2 CPU ranks, gloo) that trains every family's tiny config; see tests/ddp_worker.py. """
    out_dir = tmp_path_factory.mktemp('ddp')
    worker = Path(__file__).with_name('ddp_worker.py')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', str(worker),
         str(out_dir)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out_dir


@pytest.mark.parametrize('family', list(FAMILIES))
def test_ddp_two_cpu_ranks_end_with_identical_weights(ddp_run, family):
    rank0, rank1, init = (
        torch.load(ddp_run / f'{family}_{n}.pt', weights_only=True) for n in ('rank0', 'rank1', 'init'))
    assert rank0.keys() == rank1.keys()
    different = [k for k in rank0 if not torch.equal(rank0[k], rank1[k])]
    assert not different, different
    changed = [k for k in init if not torch.equal(rank0[k], init[k])]
    assert any(k.startswith('head') for k in changed), 'no training step happened'
    running_means = [k for k in init if k.endswith('running_mean')]
    assert all(k in changed for k in running_means), 'BatchNorm running stats not averaged over the ranks'


@pytest.mark.parametrize('family', [f for f in FAMILIES if f not in ('tnt', 'deit')])  # TNT / DeiT: no BatchNorm
def test_sync_batchnorm_conversion_is_sound_with_timms_converter_and_trains_on_gpu_only(ddp_run, family):
    """ train.py --sync-bn converts with timm's `convert_sync_batchnorm`, which keeps the activation fused into timm's
    BatchNormAct2d (TransCNN's ConvNormAct layers, Refiner's stem and refiner convs). torch's converter replaces those
    layers by a plain SyncBatchNorm and drops the activation: a different network. Either way torch's SyncBatchNorm
    forward refuses CPU tensors, so CPU DDP runs use per-rank BatchNorm + --dist-bn reduce (as the workers do).
    HAT-Net has GroupNorm only. """
    report = json.loads((ddp_run / 'sync_bn.json').read_text())[family]
    if family == 'hatnet':
        assert report == {'batchnorms': 0}
        return
    timm_report, torch_report = report['timm'], report['torch']
    assert timm_report['converted'] == report['batchnorms'] and timm_report['same_keys']
    assert timm_report['same_eval_output']
    has_norm_act = family in ('transcnn', 'refiner')
    assert torch_report['same_eval_output'] != has_norm_act
    assert 'SyncBatchNorm expected input tensor to be on GPU' in timm_report['train_error'], (
        'torch now runs SyncBatchNorm on CPU: train the DDP workers with it')


# --- kill and resume --------------------------------------------------------------------------------------------------

EPOCHS, STEPS_PER_EPOCH = 3, 2


def train_every_family(out_dir: str, kill_in_epoch: int = -1, resume: bool = False) -> None:
    """ EPOCHS x STEPS_PER_EPOCH AdamW steps of every family (with stochastic depth), checkpointed after each epoch by
    timm's CheckpointSaver as train.py does. The batch and the dropout / drop-path draws of each step come from a seed
    of (epoch, step), as they would from a resumed data loader, so a resumed run sees the same ones.

    kill_in_epoch: SIGKILL the process halfway through that epoch, after a forward pass (nothing flushed, no
        clean-up), once every family has reached it.
    resume: continue each family from its last.pth.tar with timm.models.resume_checkpoint.
    """
    torch.set_num_threads(1)  # bit-identical runs need the same kernels in every process
    for family, (name, tiny) in FAMILIES.items():
        torch.manual_seed(0)
        model = timm.create_model(name, drop_path_rate=0.1, **tiny)
        optimizer = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05)
        family_dir = os.path.join(out_dir, family)
        os.makedirs(family_dir, exist_ok=True)
        saver = CheckpointSaver(model, optimizer, checkpoint_dir=family_dir, recovery_dir=family_dir, max_history=2)
        start_epoch = 0
        if resume:
            start_epoch = timm.models.resume_checkpoint(
                model, os.path.join(family_dir, 'last.pth.tar'), optimizer, log_info=False)  # weights_only=True
        model.train()
        for epoch in range(start_epoch, EPOCHS):
            for step in range(STEPS_PER_EPOCH):
                torch.manual_seed(1000 * epoch + step)
                x = image(model, 4)
                y = torch.randint(0, model.num_classes, (4,))
                loss = torch.nn.functional.cross_entropy(model(x), y)
                if epoch == kill_in_epoch and step == STEPS_PER_EPOCH // 2:
                    break  # this family is mid-epoch; the process is killed once every family is
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            else:
                saver.save_checkpoint(epoch)
                continue
            break
        torch.save(model.state_dict(), os.path.join(family_dir, 'final.pt'))
    if kill_in_epoch >= 0:
        os.kill(os.getpid(), signal.SIGKILL)


def _run_in_new_process(*args) -> int:
    process = multiprocessing.get_context('spawn').Process(target=train_every_family, args=args)
    process.start()
    process.join(timeout=300)
    return process.exitcode


def test_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_one(tmp_path):
    """ Bit-identical: model weights, BatchNorm stats and the AdamW state all round-trip through the checkpoint. """
    assert _run_in_new_process(str(tmp_path / 'uninterrupted')) == 0
    killed = tmp_path / 'killed'
    assert _run_in_new_process(str(killed), 1) == -signal.SIGKILL
    assert _run_in_new_process(str(killed), -1, True) == 0
    for family in FAMILIES:
        expected = torch.load(tmp_path / 'uninterrupted' / family / 'final.pt', weights_only=True)
        resumed = torch.load(killed / family / 'final.pt', weights_only=True)
        different = [k for k in expected if not torch.equal(resumed[k], expected[k])]
        assert not different, (family, different)
