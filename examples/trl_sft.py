"""A TRL SFTTrainer script with packing, made sequence-parallel by longseq: the two added lines are marked `# longseq`.

    torchrun --nproc-per-node 2 examples/trl_sft.py --sp 2          # each packed row split over 2 ranks
    torchrun --nproc-per-node 2 examples/trl_sft.py --sp 1          # data-parallel only: the same losses
    torchrun --nproc-per-node 2 examples/trl_sft.py --sp 2 --lora   # LoRA adapters (PEFT)
    accelerate launch --multi_gpu --num-processes 2 examples/trl_sft.py --sp 2

A tiny random Llama and a byte-level tokenizer built in code (no download) learn short texts cut from this Python's
standard library. TRL packs them (packing=True: best-fit decreasing, padding-free rows whose position_ids restart per
document). Prints `step N loss X` for each step and a final `eval_loss X`. Each optimizer step sees the same 2 packs
whatever sp is (per-device batch = 2 // dp).
"""

from __future__ import annotations

import argparse
import os
import random
import sysconfig
from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, PrinterCallback, TrainerCallback
from trl import SFTConfig, SFTTrainer

from longseq.integrations.hf import prepare_trainer  # longseq

PACKS_PER_STEP = 2


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sp", type=int, default=2, help="sequence-parallel degree (the rest is data-parallel)")
    parser.add_argument("--plain", action="store_true", help="the stock SFTTrainer, without longseq")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters instead of every weight")
    parser.add_argument("--output-dir", default="runs/trl_sft")
    return parser.parse_args(argv)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges: one token per byte (256), then EOS and PAD."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)} | {"<eos>": 256, "<pad>": 257}
    inner = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    inner.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=inner, eos_token="<eos>", pad_token="<pad>")


def texts(count: int, seed: int) -> Dataset:
    """`count` texts of 20-200 characters cut from standard-library modules."""
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        text = sources[rng.randrange(len(sources))].read_text(encoding="utf-8", errors="replace")
        start = rng.randrange(max(1, len(text) - 250))
        rows.append(text[start:start + rng.randint(20, 200)])
    return Dataset.from_dict({"text": rows})


def tiny_llama(tokenizer) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                         pad_token_id=tokenizer.pad_token_id, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
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


def main(argv=None) -> dict:
    cli = parse(argv)
    dp = max(1, int(os.environ.get("WORLD_SIZE", "1")) // (1 if cli.plain else cli.sp))
    tokenizer = byte_tokenizer()
    args = SFTConfig(
        output_dir=cli.output_dir, max_steps=cli.steps, learning_rate=3e-3, lr_scheduler_type="constant",
        packing=True, max_length=256, per_device_train_batch_size=PACKS_PER_STEP // dp,
        per_device_eval_batch_size=PACKS_PER_STEP // dp, bf16=False, logging_steps=1, report_to=[],
        disable_tqdm=True, save_strategy="no", seed=0, ddp_find_unused_parameters=False,
        use_cpu=not torch.cuda.is_available(),
    )
    lora = None
    if cli.lora:
        from peft import LoraConfig

        lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])
    printer = PrintLosses()
    trainer = SFTTrainer(model=tiny_llama(tokenizer), args=args, processing_class=tokenizer,
                         train_dataset=texts(120, seed=1), eval_dataset=texts(25, seed=2), peft_config=lora,
                         callbacks=[printer])
    trainer.remove_callback(PrinterCallback)  # its log dicts would interleave with our lines
    if not cli.plain:
        prepare_trainer(trainer, sp=cli.sp)  # longseq
    trainer.train()
    eval_loss = trainer.evaluate()["eval_loss"]
    if trainer.is_world_process_zero():
        print(f"eval_loss {eval_loss:.6f}", flush=True)
    return {"losses": printer.losses, "eval_loss": eval_loss, "trainer": trainer}


if __name__ == "__main__":
    main()
