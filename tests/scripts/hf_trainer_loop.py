"""Local SGD under 🤗 Transformers' Trainer on 2 CPU processes (run with torchrun).

    torchrun --nproc-per-node 2 hf_trainer_loop.py OUT_DIR

A tiny GPT-2 built from a config (no downloads). Each rank writes OUT_DIR/rank<r>.pt with:

- ``plain_allreduces``: DDP all-reduces counted by a comm hook in a plain Trainer (the
  counter works);
- ``local_allreduces``: the same count under LocalSGDTrainer (k=4, no warmup), and
  ``warmup_allreduces`` with ``warmup_steps=3`` and 2-step accumulation;
- the LocalSGDTrainer's final parameters, step count and rounds, and those of a bare loop
  run on the very batches the Trainer fed this rank;
- a run resumed from the mid-period checkpoint of step 6 and its parameters at step 6;
- the accumulation run's optimizer steps and rounds.
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from localsgd_optim import LocalSGDOptimizer
from localsgd_optim.transformers import RANK_FILE, LocalSGDTrainer

K, STEPS, SAVE_AT, LR, SEQ, BATCH = 4, 10, 6, 3e-3, 16, 4
OUT = Path(sys.argv[1])


def make_model():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=160):
        self.ids = torch.randint(0, 64, (n, SEQ), generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def arguments(name, **overrides):
    options = dict(output_dir=str(OUT / name), max_steps=STEPS, per_device_train_batch_size=BATCH,
                   learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
                   warmup_steps=0, logging_steps=100, save_strategy="no", report_to=[], use_cpu=True,
                   ddp_backend="gloo", seed=0, average_tokens_across_devices=False, dataloader_num_workers=0,
                   disable_tqdm=True)
    options.update(overrides)
    return TrainingArguments(**options)


class Counting:
    """Mixed into a Trainer: counts DDP's all-reduces with a comm hook; records each batch fed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.allreduces, self.batches, self._hooked = 0, [], False

    def training_step(self, model, inputs, *args, **kwargs):
        if not self._hooked and hasattr(model, "register_comm_hook"):
            def hook(state, bucket):
                self.allreduces += 1
                return default_hooks.allreduce_hook(state, bucket)

            model.register_comm_hook(None, hook)
            self._hooked = True
        self.batches.append({k: v.clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, *args, **kwargs)


class PlainTrainer(Counting, Trainer):
    pass


class LocalTrainer(Counting, LocalSGDTrainer):
    pass


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def bare_loop(batches):
    """The same training as a plain loop: LocalSGDOptimizer(AdamW) on the batches the Trainer fed."""
    model = make_model()
    opt = LocalSGDOptimizer(torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, fused=True), k=K)  # as the Trainer
    model.train()
    for batch in batches:
        opt.zero_grad()
        # As the Trainer computes it: summed over the shifted tokens, divided by the unshifted count.
        model(**batch, num_items_in_batch=batch["labels"].ne(-100).sum()).loss.backward()
        opt.step()
    opt.sync()
    return params(model)


def main():
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ["RANK"])
    data = Tokens()
    result = {}

    plain = PlainTrainer(model=make_model(), args=arguments("plain", max_steps=3), train_dataset=data)
    plain.train()
    result["plain_allreduces"] = plain.allreduces

    local = LocalTrainer(model=make_model(), args=arguments("local", save_strategy="steps", save_steps=SAVE_AT),
                         train_dataset=data, local_sgd={"k": K})
    local.train()
    opt = local.local_sgd_optimizer
    result.update(local_allreduces=local.allreduces, local_params=params(local.model), local_steps=opt.num_steps,
                  local_rounds=opt.stats()["rounds"], fed=len(local.batches))
    result["bare_params"] = bare_loop(local.batches)
    ckpt = OUT / "local" / f"checkpoint-{SAVE_AT}"
    result["saved_own"] = torch.load(ckpt / RANK_FILE.format(rank), weights_only=True)["model"]

    resumed = LocalTrainer(model=make_model(), args=arguments("resumed"), train_dataset=data, local_sgd={"k": K})
    resumed.train(resume_from_checkpoint=str(ckpt))
    result.update(resumed_params=params(resumed.model), resumed_steps=resumed.local_sgd_optimizer.num_steps,
                  resumed_fed=len(resumed.batches))

    accumulating = LocalTrainer(model=make_model(), args=arguments("accumulate", max_steps=8,
                                                                   gradient_accumulation_steps=2),
                                train_dataset=data, local_sgd={"k": K, "warmup_steps": 3})
    accumulating.train()
    opt = accumulating.local_sgd_optimizer
    result.update(warmup_allreduces=accumulating.allreduces, accumulate_steps=opt.num_steps,
                  accumulate_rounds=opt.stats()["rounds"], accumulate_fed=len(accumulating.batches))
    torch.save(result, OUT / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
