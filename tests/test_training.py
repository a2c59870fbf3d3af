""" Training timm_hybrid models with timm's own machinery: token distillation, fine-tuning from a checkpoint file,
DistributedDataParallel under torchrun. """
import os
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
    adapted = {'head.weight', 'head.bias', 'pixel_embed.proj.weight', 'patch_pos'}
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


def test_ddp_two_cpu_ranks_end_with_identical_weights(tmp_path):
    worker = Path(__file__).with_name('ddp_worker.py')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', str(worker),
         str(tmp_path)], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1, init = (torch.load(tmp_path / f'{n}.pt') for n in ('rank0', 'rank1', 'init'))
    assert rank0.keys() == rank1.keys()
    different = [k for k in rank0 if not torch.equal(rank0[k], rank1[k])]
    assert not different, different
    assert not torch.equal(rank0['head.weight'], init['head.weight']), 'no training step happened'
    assert not torch.equal(rank0['blocks.0.inner.conv_block.bn1.running_mean'],
                           init['blocks.0.inner.conv_block.bn1.running_mean'])
