""" torchrun worker of tests/test_training.py: a few DDP steps of a nano CNT on CPU (gloo), set up the way timm's
train.py does it (per-rank seed, ClassificationTask.prepare_distributed, distribute_bn); every rank saves its weights.

    torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py OUT_DIR
"""
import os
import sys

import torch
import timm
from timm.optim import create_optimizer_v2
from timm.task import ClassificationTask
from timm.utils import distribute_bn, random_seed
from timm.utils.distributed import init_distributed_device_so

import timm_hybrid  # noqa: F401  registers the models


def main(out_dir: str, steps: int = 3) -> None:
    dist = init_distributed_device_so(device='cpu')  # torchrun's env -> gloo process group
    rank, world_size = dist['global_rank'], dist['world_size']
    assert dist['distributed'] and world_size == 2, dist
    random_seed(0, rank)  # as train.py: each rank initialises differently, DDP broadcasts rank 0's weights
    model = timm.create_model('cnt_nano_patch7_28', depth=2)
    optimizer = create_optimizer_v2(model, 'adamw', lr=1e-3)
    task = ClassificationTask(model, device=torch.device('cpu'), verbose=False).prepare_distributed()
    if rank == 0:
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, os.path.join(out_dir, 'init.pt'))
    task.train()
    for _ in range(steps):
        x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))  # each rank its own batch
        loss = task(x, y)['loss']
        optimizer.zero_grad()
        loss.backward()  # DDP all-reduces the gradients
        optimizer.step()
    distribute_bn(model, world_size, reduce=True)  # train.py --dist-bn reduce: average the BN running stats
    torch.save(model.state_dict(), os.path.join(out_dir, f'rank{rank}.pt'))
    torch.distributed.destroy_process_group()


if __name__ == '__main__':
    main(sys.argv[1])
