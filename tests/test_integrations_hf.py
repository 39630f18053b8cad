"""longseq.integrations.hf: transformers' Trainer and TRL's SFTTrainer with sequence parallelism give the stock
trainers' per-step losses (DDP and FSDP2, gradient accumulation, packing, LoRA), the exact token-mean eval loss,
checkpoints that resume exactly and HF folders that load; what cannot run exactly fails with a clear error."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("trl", reason="longseq.integrations.hf tests need the [hf] extra: pip install -e '.[hf]'")

from tests.distributed import run_distributed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEP_TOL = dict(atol=1e-5, rtol=0)  # fp32 losses after 10 AdamW steps


def example(name: str):
    """examples/<name>.py as a module (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"longseq_example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_example(name: str, tmp: str, runs: dict[str, list[str]]) -> dict:
    module = example(name)
    return {key: module.main([*argv, "--output-dir", f"{tmp}/{key}"]) for key, argv in runs.items()}


def assert_same_losses(got: dict, expected: dict, tol=STEP_TOL) -> None:
    assert len(got["losses"]) == len(expected["losses"]) > 0
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(expected["losses"]), **tol)


def token_mean_eval_loss(model, documents) -> float:
    """The eval set's loss on a plain (never sharded) copy of `model`: the mean over every target token of every
    document (DataCollatorWithFlattening gives a document's first token no target, as labels[:, 0] here)."""
    module = example("hf_trainer")
    plain = module.tiny_llama()
    plain.load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
    total, count = 0.0, 0
    with torch.no_grad():
        for document in documents:
            ids = torch.tensor([document["input_ids"]])
            total += plain(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return total / count


def _hf_trainer(tmp):
    accumulate_and_smooth = ["--grad-accum", "2", "--label-smoothing", "0.1"]
    runs = run_example("hf_trainer", tmp, {
        "sp2": ["--sp", "2"], "sp1": ["--sp", "1"], "plain": ["--plain"],
        "sp2_more": ["--sp", "2", *accumulate_and_smooth], "plain_more": ["--plain", *accumulate_and_smooth],
    })
    assert_same_losses(runs["sp2"], runs["plain"])
    assert_same_losses(runs["sp1"], runs["plain"])
    assert_same_losses(runs["sp2_more"], runs["plain_more"])  # Trainer's LabelSmoother, computed tiled
    assert runs["sp2_more"]["losses"] != runs["sp2"]["losses"]
    assert abs(runs["sp2"]["eval_loss"] - runs["sp1"]["eval_loss"]) < 1e-5
    documents = example("hf_trainer").byte_documents(7, seed=2)
    expected = token_mean_eval_loss(runs["sp2"]["trainer"].model, documents)
    assert abs(runs["sp2"]["eval_loss"] - expected) < 1e-5, (runs["sp2"]["eval_loss"], expected)


def test_hf_trainer_sp2_matches_sp1_and_stock_trainer(tmp_path):
    """Per-step losses of sp=2, sp=1 and the stock Trainer agree (with and without gradient accumulation, with label
    smoothing), and the eval loss is the token mean over the eval set, as an unsharded model computes it."""
    run_distributed(_hf_trainer, 2, str(tmp_path))


def _trl_sft(tmp):
    runs = run_example("trl_sft", tmp, {
        "sp2": ["--sp", "2"], "sp1": ["--sp", "1"], "plain": ["--plain"],
        "sp2_lora": ["--sp", "2", "--lora"], "plain_lora": ["--plain", "--lora"],
    })
    assert_same_losses(runs["sp2"], runs["plain"])
    assert_same_losses(runs["sp1"], runs["plain"])
    assert_same_losses(runs["sp2_lora"], runs["plain_lora"])
    assert runs["sp2_lora"]["losses"] != runs["sp2"]["losses"]
    assert abs(runs["sp2"]["eval_loss"] - runs["sp1"]["eval_loss"]) < 1e-5
    assert not runs["sp2"]["trainer"].args.gradient_checkpointing  # TRL's default, handed to longseq's checkpoints


def test_trl_sft_packing_and_lora_match_stock_sft_trainer(tmp_path):
    """SFTTrainer with packing (padding-free rows, position_ids per document): sp=2, sp=1 and the stock trainer agree
    step by step, with full fine-tuning and with LoRA."""
    run_distributed(_trl_sft, 2, str(tmp_path))


def fsdp_on_cpu(trainer) -> None:
    """accelerate switches FSDP on for GPUs only (on CPU it silently runs DDP); set its state as it would be on GPUs,
    so that accelerate's own FSDP2 preparation (fully_shard per decoder layer, then the root) runs on gloo."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    state.distributed_type = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


def _fsdp(tmp):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    module, runs = example("hf_trainer"), {}
    for key, argv in {"sp2": ["--sp", "2"], "plain": ["--plain"]}.items():
        trainer, printer = module.build_trainer(module.parse([*argv, "--fsdp", "--output-dir", f"{tmp}/{key}"]))
        fsdp_on_cpu(trainer)
        trainer.train()
        assert isinstance(trainer.model, FSDPModule)
        runs[key] = {"losses": printer.losses, "eval_loss": trainer.evaluate()["eval_loss"], "trainer": trainer}
    assert_same_losses(runs["sp2"], runs["plain"])
    weights = get_model_state_dict(runs["sp2"]["trainer"].model, options=StateDictOptions(full_state_dict=True))
    unsharded = module.tiny_llama()
    unsharded.load_state_dict(weights)
    expected = token_mean_eval_loss(unsharded, module.byte_documents(7, seed=2))
    assert abs(runs["sp2"]["eval_loss"] - expected) < 1e-5, (runs["sp2"]["eval_loss"], expected)


def check_hf_folder(path: str, eval_loss: float) -> None:
    """The folder loads with from_pretrained (no longseq) and gives the trained model's eval loss."""
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(path)
    documents = example("hf_trainer").byte_documents(7, seed=2)
    assert abs(token_mean_eval_loss(loaded, documents) - eval_loss) < 1e-5


def test_fsdp2_through_accelerate_matches_stock_fsdp2(tmp_path):
    """accelerate's FSDP plugin (fsdp_version=2) shards the longseq model: sp=2 gives the stock Trainer's FSDP2
    losses, and the sharded eval loss is the unsharded model's token mean."""
    run_distributed(_fsdp, 2, str(tmp_path))


def _resume(tmp):
    runs = run_example("hf_trainer", tmp, {"full": ["--sp", "2", "--save-steps", "5"]})
    resumed = example("hf_trainer").main(["--sp", "2", "--output-dir", f"{tmp}/resumed",
                                          "--resume", f"{tmp}/full/checkpoint-5"])
    assert len(resumed["losses"]) == 5
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(runs["full"]["losses"][5:]), **STEP_TOL)
    assert abs(resumed["eval_loss"] - runs["full"]["eval_loss"]) < 1e-5
    resumed["trainer"].save_model(f"{tmp}/hf")
    if dist.get_rank() == 0:
        check_hf_folder(f"{tmp}/hf", resumed["eval_loss"])


def test_checkpoint_resume_is_exact_and_saves_an_hf_folder(tmp_path):
    """Resuming from the step-5 Trainer checkpoint (weights, optimizer, data position) repeats steps 6-10 exactly."""
    run_distributed(_resume, 2, str(tmp_path))


def self_naming_documents(count: int) -> list[dict]:
    """Document i is the token i repeated 3-6 times, so a batch shows which documents it holds."""
    return [{"input_ids": [i] * (3 + i % 4), "labels": [i] * (3 + i % 4)} for i in range(1, count + 1)]


def data_trainer(tmp, train, **overrides):
    from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

    from longseq.integrations.hf import prepare_trainer

    settings = dict(output_dir=tmp, per_device_train_batch_size=2, per_device_eval_batch_size=2, report_to=[],
                    use_cpu=True, seed=0, max_steps=4) | overrides
    trainer = Trainer(model=example("hf_trainer").tiny_llama(), args=TrainingArguments(**settings),
                      train_dataset=train, eval_dataset=self_naming_documents(5),
                      data_collator=DataCollatorWithFlattening())
    return prepare_trainer(trainer, sp=2, memory=False)


def documents_per_batch(loader) -> list[tuple[list[int], bool]]:
    """(documents in the batch, whether any token has a target) for each batch."""
    return [(sorted(set(batch["input_ids"].flatten().tolist())), bool((batch["labels"] != -100).any()))
            for batch in loader]


def gather(value) -> list:
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield from self_naming_documents(16)


def _data(tmp):
    from longseq.integrations.hf_data import check_same_batch

    trainer = data_trainer(tmp, self_naming_documents(16))
    train = gather(documents_per_batch(trainer.get_train_dataloader()))
    evaluation = gather(documents_per_batch(trainer.get_eval_dataloader()))
    assert train[0] == train[1] and train[2] == train[3]  # ranks 0, 1 are dp group 0; ranks 2, 3 dp group 1
    assert sorted(d for batch, _ in train[0] + train[2] for d in batch) == list(range(1, 17))
    assert evaluation[0] == evaluation[1] and evaluation[2] == evaluation[3]
    assert len(evaluation[0]) == len(evaluation[2]) == 2  # 5 documents: dp group 1 takes a batch without targets
    real = [d for rank in (0, 2) for batch, targets in evaluation[rank] if targets for d in batch]
    assert sorted(real) == [1, 2, 3, 4, 5]  # each document once: nothing repeated to fill the last batch
    mesh = trainer._longseq.mesh
    with pytest.raises(ValueError, match="received different batches"):
        check_same_batch(torch.tensor([[dist.get_rank()]]), mesh)
    with pytest.raises(ValueError, match="dispatch_batches"):
        data_trainer(tmp, Stream()).get_train_dataloader()
    streamed = data_trainer(tmp, Stream(), accelerator_config={"dispatch_batches": False})
    train = gather(documents_per_batch(streamed.get_train_dataloader()))
    assert train[0] == train[1] and train[2] == train[3] and train[0] != train[2]
    runs = run_example("hf_trainer", tmp, {"sp2": ["--sp", "2"], "plain": ["--plain"]})
    assert_same_losses(runs["sp2"], runs["plain"])


def test_sp_ranks_share_batches_and_dp_groups_split_them(tmp_path):
    """4 ranks, sp=2 × dp=2: the sp ranks of a group read the same batches, the groups read disjoint ones (map-style
    and iterable datasets), evaluation sees each document once, a mismatch fails loudly, and training with dp=2
    groups of sp=2 gives the stock Trainer's losses on 4 data-parallel ranks."""
    run_distributed(_data, 4, str(tmp_path))


def padded_trainer(tmp, side: str, longseq: bool, **collator_settings):
    """A Trainer on 6 documents of different lengths, padded by DataCollatorForLanguageModeling (one process)."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from longseq.integrations.hf import prepare_trainer

    tokenizer = example("trl_sft").byte_tokenizer()
    tokenizer.padding_side = side
    documents = [{"input_ids": tokenizer(f"document {i} " * (i + 1))["input_ids"]} for i in range(6)]
    args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=3, max_steps=2, learning_rate=3e-3,
                             report_to=[], use_cpu=True, seed=0, logging_steps=1, disable_tqdm=True)
    trainer = Trainer(model=example("trl_sft").tiny_llama(tokenizer), args=args, train_dataset=documents,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False, **collator_settings))
    return prepare_trainer(trainer, sp=1) if longseq else trainer


def test_right_padding_gives_the_stock_losses_and_left_padding_fails(tmp_path):
    """Padded rows (one document each, padding after it) are exact: no real token sees padding under causal
    attention; left padding would put padding inside attention windows, and fails with the fix in the message."""
    losses = {}
    for longseq in (True, False):
        trainer = padded_trainer(str(tmp_path), "right", longseq)
        trainer.train()
        losses[longseq] = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), **STEP_TOL)
    with pytest.raises(ValueError, match="left padding"):
        padded_trainer(str(tmp_path), "left", True).train()


def test_flattened_documents_without_position_ids_fail(tmp_path):
    from transformers import DataCollatorWithFlattening

    module = example("hf_trainer")
    trainer, _ = module.build_trainer(module.parse(["--sp", "1", "--steps", "1", "--output-dir", str(tmp_path)]))
    trainer.data_collator = DataCollatorWithFlattening(return_position_ids=False, return_flash_attn_kwargs=True)
    with pytest.raises(ValueError, match="no position_ids.*return_position_ids=True"):
        trainer.train()


def test_unsupported_settings_fail_at_prepare(tmp_path):
    from transformers import Trainer, TrainingArguments

    from longseq.integrations.hf import prepare_trainer

    module = example("hf_trainer")
    args = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = Trainer(model=module.tiny_llama(), args=TrainingArguments(**args), compute_metrics=lambda p: {})
    with pytest.raises(ValueError, match="compute_metrics is not supported"):
        prepare_trainer(trainer)
    trainer = Trainer(model=module.tiny_llama(), args=TrainingArguments(**args))
    prepare_trainer(trainer, memory=False)
    with pytest.raises(RuntimeError, match="already called"):
        prepare_trainer(trainer)


def test_activation_checkpointing_is_handed_to_longseq(tmp_path, caplog):
    from transformers import Trainer, TrainingArguments

    from longseq.integrations.hf import prepare_trainer

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, gradient_checkpointing=True)
    model = example("hf_trainer").tiny_llama()
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    with caplog.at_level(logging.WARNING, logger="longseq"):
        prepare_trainer(Trainer(model=model, args=args))
    assert "activation checkpointing switched off" in caplog.text
    assert not args.gradient_checkpointing and not any(getattr(m, "gradient_checkpointing", False)
                                                       for m in model.modules())


def test_loss_weights_and_z_loss_reach_the_loss(tmp_path):
    """A batch's loss_weights (one per label) and prepare_trainer's z_loss give Note [Loss options]'s mean."""
    import torch.nn.functional as F
    from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

    from longseq.integrations.hf import prepare_trainer

    module = example("hf_trainer")
    plain = module.tiny_llama()
    trainer = Trainer(model=module.tiny_llama(), args=TrainingArguments(output_dir=str(tmp_path), report_to=[],
                                                                        use_cpu=True))
    prepare_trainer(trainer, z_loss=1e-2)
    batch = DataCollatorWithFlattening()(module.byte_documents(3, seed=4))
    batch["loss_weights"] = torch.rand(batch["labels"].shape, generator=torch.Generator().manual_seed(0))
    got = trainer.compute_loss(trainer.model, batch)
    # use_cache=False: with a cache, transformers would not read document boundaries from position_ids.
    logits = plain(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0, :-1]
    targets, weights = batch["labels"][0, 1:], batch["loss_weights"][0, 1:]
    per_token = F.cross_entropy(logits, targets, reduction="none") + 1e-2 * logits.logsumexp(-1).square()
    valid = targets != -100
    torch.testing.assert_close(got, (per_token * weights)[valid].sum() / valid.sum())
