""" torchrun worker of tests/test_training.py: a few DDP steps of every family's tiny config (tests/test_reliability.py
FAMILIES) on CPU (gloo), set up the way timm's train.py does it (per-rank seed, ClassificationTask.prepare_distributed,
distribute_bn); every rank saves its weights per family, and rank 0 what SyncBatchNorm conversion did.

    torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py OUT_DIR

SyncBatchNorm (train.py --sync-bn) is checked on every model with BatchNorm, converted by torch's
`SyncBatchNorm.convert_sync_batchnorm` and by timm's `timm.layers.convert_sync_batchnorm` (what train.py calls): all
BatchNorms replaced, state dict keys unchanged, same eval output. Its training forward runs on CUDA / XPU / HPU only:
on CPU torch raises "SyncBatchNorm expected input tensor to be on GPU". The CPU ranks therefore train with per-rank
BatchNorm and average the running stats after training (train.py --dist-bn reduce), as train.py does without
--sync-bn.
"""
import copy
import json
import os
import sys

import torch
import timm
from timm.optim import create_optimizer_v2
from timm.task import ClassificationTask
from timm.utils import distribute_bn, random_seed
from timm.utils.distributed import init_distributed_device_so

import timm_hybrid  # noqa: F401  registers the models
from test_reliability import FAMILIES, image


def check_sync_batchnorm(model: torch.nn.Module) -> dict:
    """ What torch's and timm's `convert_sync_batchnorm` do to `model`: BatchNorms converted, keys kept, same eval
    output, and whether the training forward runs on CPU. """
    num_bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if not num_bn:
        return {'batchnorms': 0}
    keys, x = sorted(model.state_dict()), image(model, 2)
    with torch.no_grad():
        expected = model.eval()(x)
    report = {'batchnorms': num_bn}
    for source, convert in (('torch', torch.nn.SyncBatchNorm.convert_sync_batchnorm),
                            ('timm', timm.layers.convert_sync_batchnorm)):
        converted = convert(copy.deepcopy(model))
        with torch.no_grad():
            eval_output = converted.eval()(x)
        try:
            converted.train()(x)
            train_error = None
        except ValueError as e:
            train_error = str(e)
        report[source] = {
            'converted': sum(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules()),
            'same_keys': sorted(converted.state_dict()) == keys,
            'same_eval_output': torch.equal(eval_output, expected),
            'train_error': train_error,
        }
    return report


def main(out_dir: str, steps: int = 3) -> None:
    dist = init_distributed_device_so(device='cpu')  # torchrun's env -> gloo process group
    rank, world_size = dist['global_rank'], dist['world_size']
    assert dist['distributed'] and world_size == 2, dist
    sync_bn = {}
    for family, (name, tiny) in FAMILIES.items():
        random_seed(0, rank)  # as train.py: each rank initialises differently, DDP broadcasts rank 0's weights
        model = timm.create_model(name, **tiny)
        if rank == 0:
            sync_bn[family] = check_sync_batchnorm(timm.create_model(name, **tiny))
        optimizer = create_optimizer_v2(model, 'adamw', lr=1e-3)
        task = ClassificationTask(model, device=torch.device('cpu'), verbose=False).prepare_distributed()
        if rank == 0:
            init = {k: v.clone() for k, v in model.state_dict().items()}
            torch.save(init, os.path.join(out_dir, f'{family}_init.pt'))
        task.train()
        for _ in range(steps):
            x = image(model, 4)  # each rank its own batch
            y = torch.randint(0, model.num_classes, (4,))
            loss = task(x, y)['loss']
            optimizer.zero_grad()
            loss.backward()  # DDP all-reduces the gradients
            optimizer.step()
        distribute_bn(model, world_size, reduce=True)  # train.py --dist-bn reduce: average the BN running stats
        torch.save(model.state_dict(), os.path.join(out_dir, f'{family}_rank{rank}.pt'))
    if rank == 0:
        with open(os.path.join(out_dir, 'sync_bn.json'), 'w') as f:
            json.dump(sync_bn, f)
    torch.distributed.destroy_process_group()


if __name__ == '__main__':
    main(sys.argv[1])
