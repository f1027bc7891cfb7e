"""Local SGD under PyTorch Lightning's DDP strategy on 2 CPU processes (Lightning launches them).

    python lightning_loop.py OUT_DIR full      # 3 epochs (checkpointed after the first), then a bare loop
    python lightning_loop.py OUT_DIR resume    # resume that checkpoint to 3 epochs

Each rank writes its final parameters, step count and (full) the bare loop's parameters
to OUT_DIR/<phase>_rank<r>.pt, and (full) the step count saved in the checkpoint to
OUT_DIR/first_rank<r>.pt.
"""

import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from localsgd_optim import LocalSGDOptimizer
from localsgd_optim.lightning import LocalSGDCallback

K, BATCH, N = 4, 4, 80  # 80 samples / 2 ranks / batch 4: 10 steps per epoch (mid-period at epoch ends)


def make_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))


def make_opt(params):
    opt = LocalSGDOptimizer(torch.optim.AdamW(params, lr=0.01), k=K)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)


def dataset():
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(N, 6, generator=g), torch.randn(N, 2, generator=g))


class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = make_net()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        opt, sched = make_opt(self.parameters())
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self):
        return DataLoader(dataset(), batch_size=BATCH, shuffle=False)


class SaveAfterFirstEpoch(pl.Callback):
    """trainer.save_checkpoint at the end of epoch 0, mid-period for k=4 (10 steps)."""

    def __init__(self, out: Path):
        self.out = out

    def on_train_epoch_end(self, trainer, module):
        if trainer.current_epoch == 0:
            trainer.save_checkpoint(self.out / "first.ckpt")
            torch.save({"num_steps": trainer.optimizers[0].num_steps}, self.out / f"first_rank{trainer.global_rank}.pt")


def bare_loop(epochs, rank, world):
    net = make_net()
    model = DDP(net)
    opt, sched = make_opt(net.parameters())
    # Lightning puts a shuffling DistributedSampler (seed 0, set_epoch each epoch) on the train loader
    sampler = DistributedSampler(dataset(), num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(dataset(), batch_size=BATCH, sampler=sampler)
    with opt.no_sync(model):
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            for x, y in loader:
                opt.zero_grad()
                nn.functional.mse_loss(model(x), y).backward()
                opt.step()
                sched.step()
    return [p.detach().clone() for p in net.parameters()]


def main():
    out, phase = Path(sys.argv[1]), sys.argv[2]
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    saver = [SaveAfterFirstEpoch(out)] if phase == "full" else []
    trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=3,
                         callbacks=[LocalSGDCallback(), *saver], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    module = Module()
    trainer.fit(module, ckpt_path=str(out / "first.ckpt") if phase == "resume" else None)
    rank, world = trainer.global_rank, trainer.world_size
    result = {"params": [p.detach().clone() for p in module.net.parameters()],
              "num_steps": trainer.optimizers[0].num_steps}
    if phase == "full":
        result["bare"] = bare_loop(3, rank, world)
    torch.save(result, out / f"{phase}_rank{rank}.pt")
    dist.barrier()


if __name__ == "__main__":
    main()
