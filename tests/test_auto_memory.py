"""longseq.apply(model, mesh, "auto"): the planner's memory features per batch shape (Note [Automatic memory]).

The auto path equals the explicit MemoryConfig it chose (loss and every gradient), at lengths where the plan
chooses differently, switching back and forth within one model, on one rank and on two gloo ranks, for a dense, a
mixture-of-experts and a hybrid (Gated DeltaNet) model; what the plan
switches off does not run; packed documents and batch > 1 reach the planner; impossible budgets fail in one line.
"""

from __future__ import annotations

import copy

import pytest
import torch

import longseq
from longseq.memory import checkpoint_offload
from longseq.memory.tiled import TiledFunction
from longseq.models.auto_memory import infer_training
from longseq.parallel import attention as attention_module
from longseq.plan import PlanError
from longseq.plan.planner import machine_for
from longseq.state import longseq_state
from tests.distributed import run_distributed
from tests.models import assert_grads_equal, batch, tiny_model

# A GPU this small flips the tiny model's features between 512 and 2048 tokens (checked below, so the tests cannot
# pass with one configuration); offload_min_bytes=0 so that its tiny checkpoints really go to the host.
SMALL = machine_for("cpu", gpu_memory_gib=0.012, host_memory_gib=0.05)
AUTO = dict(machine=SMALL, training="forward-backward", offload_min_bytes=0)


def step(model, data: dict, mesh=None):
    """Loss and backward of one batch (sharded over `mesh`), gradients zeroed first."""
    model.zero_grad()
    loss = longseq.causal_lm_loss(model, longseq.shard_batch(data, mesh or longseq.Mesh()), mesh)
    loss.backward()
    return loss


def check_against_explicit(reference, auto, data: dict, mesh=None):
    """auto's step equals a fresh copy of the reference under the config auto chose; returns that config."""
    loss = step(auto, data, mesh)
    chosen = longseq.memory_config_in_use(auto)
    explicit = longseq.apply(copy.deepcopy(reference), mesh, chosen)
    torch.testing.assert_close(loss, step(explicit, data, mesh))
    assert_grads_equal(explicit, auto)
    return chosen


def test_auto_equals_the_config_it_chose_switching_back_and_forth():
    reference = tiny_model(num_hidden_layers=3)
    auto = longseq.apply(copy.deepcopy(reference), None, longseq.AutoMemory(**AUTO))
    assert longseq.memory_config_in_use(auto) is None  # nothing planned before the first forward
    chosen = {n: check_against_explicit(reference, auto, batch(n)) for n in (512, 2048, 1024)}
    assert not chosen[512].offload_checkpoints and chosen[2048].offload_checkpoints and chosen[2048].tiled_norms
    assert chosen[1024] not in (chosen[512], chosen[2048])
    for n in (512, 2048):  # back to shapes planned before: their cached plans again
        assert check_against_explicit(reference, auto, batch(n)) == chosen[n]
    assert longseq.memory.offload_stats(auto).offloaded_tensors > 0
    hf = copy.deepcopy(reference)
    data = batch(2048)
    torch.testing.assert_close(step(auto, data), hf(input_ids=data["input_ids"], labels=data["labels"]).loss)


def _count(monkeypatch, owner, name: str) -> list:
    calls = []
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


@pytest.mark.parametrize("memory", ["auto", "all on"])
def test_what_the_plan_switches_off_does_not_run(monkeypatch, memory):
    """At 256 tokens on an H200 the plan keeps nothing on the host, tiles nothing and runs the model's own SDPA;
    the same counters under every feature switched on show that they can see the work."""
    big = longseq.AutoMemory(machine=machine_for("h200"), training="forward-backward", offload_min_bytes=0)
    config = big if memory == "auto" else longseq.MemoryConfig(offload_min_bytes=0, tile_tokens=64)
    model = longseq.apply(tiny_model(num_hidden_layers=3), None, config)
    tiles = _count(monkeypatch, TiledFunction, "apply")
    checkpoints = _count(monkeypatch, checkpoint_offload, "checkpoint")
    blocks = _count(monkeypatch, attention_module, "block_attention")
    step(model, batch(256))
    stats = longseq.memory.offload_stats(model)
    work = (len(tiles), len(checkpoints), len(blocks), stats.offloaded_tensors)
    if memory == "auto":
        chosen = longseq.memory_config_in_use(model)
        assert not (chosen.offload_checkpoints or chosen.tiled_norms or chosen.tiled_loss)
        assert work == (0, 0, 0, 0)
    else:
        assert all(work)


def test_packed_documents_and_batch_reach_the_planner():
    reference = tiny_model(num_hidden_layers=3)
    auto = longseq.apply(copy.deepcopy(reference), None, longseq.AutoMemory(**AUTO))
    data = batch(1024, rows=2, documents=[300, 600, 124])
    chosen = check_against_explicit(reference, auto, data)
    plans = longseq_state(auto).auto_memory.plans
    assert list(plans) == [(2, 1024, 600)]  # rows, length, longest document
    assert chosen.cache_attention  # the plan keeps longseq's attention for packed documents on one GPU
    one_document = check_against_explicit(reference, auto, batch(1024, rows=2))
    assert (2, 1024, None) in plans and one_document is not None


def test_override_forces_its_field():
    reference = tiny_model(num_hidden_layers=3)
    auto = longseq.apply(copy.deepcopy(reference), None, longseq.AutoMemory(**AUTO, tiled_loss=False,
                                                                            cache_attention=False))
    chosen = check_against_explicit(reference, auto, batch(2048))
    assert chosen.offload_checkpoints and not chosen.tiled_loss and not chosen.cache_attention


def test_impossible_budget_fails_at_the_first_forward_in_one_line():
    tiny_gpu = machine_for("cpu", gpu_memory_gib=0.004, host_memory_gib=0.05)
    model = longseq.apply(tiny_model(num_hidden_layers=3), None,
                          longseq.AutoMemory(machine=tiny_gpu, training="forward-backward"))
    with pytest.raises(PlanError, match=r"^longseq.apply\(\.\.\., 'auto'\): nothing fits 1 × 4096 tokens .*short by"):
        step(model, batch(4096))
    with pytest.raises(PlanError):  # the failed shape's answer is cached: the same error again
        step(model, batch(4096))


def test_cpu_without_machine_and_bad_arguments_fail_in_one_line():
    with pytest.raises(PlanError, match="has no CUDA: pass longseq.AutoMemory\\(machine=longseq.plan.machine_for"):
        longseq.apply(tiny_model(), None, "auto")
    with pytest.raises(ValueError, match="tiled_mpl=...\\): not MemoryConfig fields"):
        longseq.AutoMemory(tiled_mpl=False)
    with pytest.raises(ValueError, match="pass 'auto'"):
        longseq.apply(tiny_model(), None, "automatic")
    chunked = tiny_model()  # Llama-4's chunked attention: a layer type the plan does not model
    chunked.config.layer_types = ["chunked_attention", "full_attention"]
    with pytest.raises(PlanError, match=r"layer types \['chunked_attention'\] are not modelled.*memory.auto: false"):
        longseq.apply(chunked, None, longseq.AutoMemory(machine=SMALL))


def test_training_mode_inferred_from_trainable_parameters():
    model = tiny_model()
    assert infer_training(model) == "full"
    for name, p in model.named_parameters():
        p.requires_grad_("layers.0.mlp.down_proj" in name)  # a small trainable part: adapters on frozen weights
    assert infer_training(model) == "lora"


# GPUs this small flip the tiny mixture-of-experts and hybrid models' features between 512 tokens and a longer
# length: Qwen3-MoE at 2048 (0.015 GiB and above, 0.021 the most tried); Qwen3-Next at 4096 (0.032-0.054 GiB), as
# at 2048 its checkpoints save 0.2 MiB against the Gated DeltaNet blocks' fixed bytes, less than a 0.001 GiB step.
MIXED = {"qwen3_moe": (0.016, 2048), "qwen3_next": (0.04, 4096)}


@pytest.mark.parametrize("family", sorted(MIXED))
def test_auto_on_experts_and_linear_attention(family):
    """Qwen3-MoE (a dense layer, then an expert block; the router loss on) and Qwen3-Next (a Gated DeltaNet layer,
    then attention): the auto path equals the config it chose, the router loss too."""
    reference = tiny_model(family)
    gpu_gib, longer = MIXED[family]
    machine = machine_for("cpu", gpu_memory_gib=gpu_gib, host_memory_gib=0.05)
    auto = longseq.apply(copy.deepcopy(reference), None, longseq.AutoMemory(**{**AUTO, "machine": machine}))
    chosen = {n: check_against_explicit(reference, auto, batch(n)) for n in (512, longer)}
    assert not chosen[512].offload_checkpoints and chosen[longer].offload_checkpoints
    if reference.config.output_router_logits:
        explicit = longseq.apply(copy.deepcopy(reference), None, chosen[longer])
        auto_aux, explicit_aux = (m(**longseq.shard_batch(batch(longer), longseq.Mesh())).aux_loss
                                  for m in (auto, explicit))
        torch.testing.assert_close(auto_aux, explicit_aux)


def _auto_on_two_ranks(family: str = "llama", gpu_memory_gib: float = 0.008):
    mesh = longseq.init_mesh(sp=2)
    reference = tiny_model(family, num_hidden_layers=3) if family == "llama" else tiny_model(family)
    machine = machine_for("cpu", gpu_memory_gib=gpu_memory_gib, host_memory_gib=0.1, gpus_per_host=2)
    auto = longseq.apply(copy.deepcopy(reference), mesh,
                         longseq.AutoMemory(machine=machine, training="forward-backward", offload_min_bytes=0))
    chosen = []
    for n, documents in ((512, None), (2048, [1000, 1048]), (512, None)):
        data = batch(n, documents=documents)
        data["position_ids"] = data.get("position_ids", torch.arange(n)[None])
        chosen.append(check_against_explicit(reference, auto, data, mesh))
    assert not chosen[0].offload_checkpoints and chosen[1].offload_checkpoints and chosen[2] == chosen[0]
    assert list(longseq_state(auto).auto_memory.plans) == [(1, 512, None), (1, 2048, 1048)]


@pytest.mark.parametrize("family, gpu_memory_gib", [("llama", 0.008), ("qwen3_moe", 0.012)])
def test_auto_on_two_gloo_ranks(family, gpu_memory_gib):
    run_distributed(_auto_on_two_ranks, 2, family, gpu_memory_gib)
