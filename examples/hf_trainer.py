"""A transformers Trainer script made sequence-parallel by longseq: the two added lines are marked `# longseq`.

    torchrun --nproc-per-node 2 examples/hf_trainer.py --sp 2      # each packed row split over 2 ranks (GPUs or CPU)
    torchrun --nproc-per-node 2 examples/hf_trainer.py --sp 1      # data-parallel only: the same losses
    torchrun --nproc-per-node 2 examples/hf_trainer.py --plain     # stock Trainer, no longseq: the same losses again
    accelerate launch --multi_gpu --num-processes 2 examples/hf_trainer.py --sp 2   # --multi_gpu also on CPU

A tiny random Llama reads this Python's standard-library sources as bytes; DataCollatorWithFlattening packs each
batch's documents into one row with position_ids restarting per document. Prints `step N loss X` for each step and a
final `eval_loss X`. Each optimizer step sees the same 4 documents whatever sp is (per-device batch = 4 // dp).
On a machine without GPUs, `accelerate launch` needs --multi_gpu to start more than one process.
"""

from __future__ import annotations

import argparse
import os
import random
import sysconfig
from pathlib import Path

import torch
from transformers import (
    DataCollatorWithFlattening, LlamaConfig, LlamaForCausalLM, PrinterCallback, Trainer, TrainerCallback,
    TrainingArguments,
)

from longseq.integrations.hf import prepare_trainer  # longseq

DOCUMENTS_PER_STEP = 4
EOS = 256


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sp", type=int, default=2, help="sequence-parallel degree (the rest is data-parallel)")
    parser.add_argument("--plain", action="store_true", help="the stock Trainer, without longseq")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (each of 4 documents)")
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="TrainingArguments.label_smoothing_factor")
    parser.add_argument("--fsdp", action="store_true",
                        help="FSDP2 through accelerate instead of DDP (on GPUs: accelerate runs DDP on CPU)")
    parser.add_argument("--output-dir", default="runs/hf_trainer")
    parser.add_argument("--save-steps", type=int, default=0, help="save a Trainer checkpoint every N steps")
    parser.add_argument("--resume", default=None, help="resume from this checkpoint directory")
    return parser.parse_args(argv)


def byte_documents(count: int, seed: int) -> list[dict]:
    """`count` documents of 30-250 bytes cut from standard-library modules, each ending in EOS."""
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    rng = random.Random(seed)
    documents = []
    for index in range(count):
        text = sources[rng.randrange(len(sources))].read_bytes()
        start = rng.randrange(max(1, len(text) - 300))
        ids = list(text[start:start + rng.randint(30, 250)]) + [EOS]
        documents.append({"input_ids": ids, "labels": ids})
    return documents


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=EOS + 1, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)
    torch.manual_seed(0)  # the same weights on every rank
    return LlamaForCausalLM(config).float()


class PrintLosses(TrainerCallback):
    """Prints `step N loss X` on the first rank and keeps the losses."""

    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])
            if state.is_world_process_zero:
                print(f"step {state.global_step} loss {logs['loss']:.6f}", flush=True)


def training_arguments(cli, dp: int) -> TrainingArguments:
    fsdp = dict(fsdp=True, fsdp_config={"fsdp_version": 2}) if cli.fsdp else {}
    return TrainingArguments(
        output_dir=cli.output_dir, max_steps=cli.steps, learning_rate=3e-3, lr_scheduler_type="constant",
        per_device_train_batch_size=DOCUMENTS_PER_STEP // dp, gradient_accumulation_steps=cli.grad_accum,
        per_device_eval_batch_size=max(1, 2 // dp), label_smoothing_factor=cli.label_smoothing, logging_steps=1, report_to=[], disable_tqdm=True, seed=0,
        save_strategy="steps" if cli.save_steps else "no", save_steps=cli.save_steps or 500,
        ddp_find_unused_parameters=False, use_cpu=not torch.cuda.is_available(), **fsdp,
    )


def build_trainer(cli) -> tuple[Trainer, PrintLosses]:
    dp = max(1, int(os.environ.get("WORLD_SIZE", "1")) // (1 if cli.plain else cli.sp))
    printer = PrintLosses()
    trainer = Trainer(
        model=tiny_llama(), args=training_arguments(cli, dp), data_collator=DataCollatorWithFlattening(),
        train_dataset=byte_documents(DOCUMENTS_PER_STEP * cli.grad_accum * cli.steps, seed=1),
        eval_dataset=byte_documents(7, seed=2), callbacks=[printer],
    )
    trainer.remove_callback(PrinterCallback)  # its log dicts would interleave with our lines
    if not cli.plain:
        prepare_trainer(trainer, sp=cli.sp)  # longseq
    return trainer, printer


def main(argv=None) -> dict:
    cli = parse(argv)
    trainer, printer = build_trainer(cli)
    trainer.train(resume_from_checkpoint=cli.resume)
    eval_loss = trainer.evaluate()["eval_loss"]
    if trainer.is_world_process_zero():
        print(f"eval_loss {eval_loss:.6f}", flush=True)
    return {"losses": printer.losses, "eval_loss": eval_loss, "trainer": trainer}


if __name__ == "__main__":
    main()
