"""Gated DeltaNet hybrids on the GPU over NCCL (called from nccl_checks.py for every mesh): a small Qwen3-Next and
Qwen3.5 in fp32, sharded by heads and by state passing, against the same model unsharded with each packed document
run on its own (transformers' torch path runs across documents; longseq restarts at each)."""

from __future__ import annotations

import copy

import torch

import longseq


def hybrid_model(family: str, device, dtype, seed: int = 0):
    """Qwen3-Next's or Qwen3.5's layer pattern at a small width: 16 key / 32 value heads would not fit a check, so
    4 key and 8 value heads of 32; 3 Gated DeltaNet layers, then attention."""
    import transformers

    config = getattr(transformers, {"qwen3_next": "Qwen3NextConfig", "qwen3_5": "Qwen3_5TextConfig"}[family])(
        hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        head_dim=32, vocab_size=1000, linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=32,
        linear_value_head_dim=32, layer_types=["linear_attention"] * 3 + ["full_attention"],
        **({"num_experts": 0} if family == "qwen3_next" else {}))
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype).train()
    with torch.no_grad():  # decays slow enough that state handed between ranks matters (as in tests/models.py)
        for net in longseq.models.hybrid.gated_delta_nets(model):
            net.A_log.copy_(torch.empty_like(net.A_log).uniform_(0.01, 0.15).log())
            net.dt_bias.zero_()
    return model


def per_document_loss(model, data) -> torch.Tensor:
    """The mean next-token loss with every packed document run alone (position_ids restarting mark them)."""
    from longseq.parallel.documents import document_boundaries

    ids, positions = data["input_ids"], data["position_ids"]
    rows = []
    for row in range(ids.shape[0]):
        bounds = document_boundaries(positions[row:row + 1])[0]
        rows.append(torch.cat([model(input_ids=ids[row:row + 1, a:b], position_ids=positions[row:row + 1, a:b],
                                     use_cache=False).logits for a, b in zip(bounds[:-1], bounds[1:])], dim=1))
    logits = torch.cat(rows)
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), data["labels"][:, 1:].flatten())


def check_linear_attention(results: list[dict], mesh, report, device="cuda") -> None:
    """Loss and every gradient (relative to its largest entry) against the per-document unsharded model: fp32, or
    bf16 against the plain model in bf16 with a ring (the ring's CUDA kernels take bf16/fp16 only)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    dtype = torch.float32 if mesh.ring == 1 else torch.bfloat16
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 1000, (2, 1999), generator=g).to(device)
    positions = torch.cat([torch.arange(700), torch.arange(1299)]).to(device)[None].expand(2, -1)
    data = dict(input_ids=ids, labels=ids, position_ids=positions)
    for family in ("qwen3_next", "qwen3_5"):
        model = hybrid_model(family, device, dtype)
        reference = copy.deepcopy(model)
        ref_loss = per_document_loss(reference, data)
        ref_loss.backward()
        for mode in ("heads", "state") if mesh.sp > 1 else ("heads",):
            sharded = longseq.apply(copy.deepcopy(model), mesh, linear_attention=mode)
            loss = longseq.causal_lm_loss(sharded, longseq.shard_batch(data, mesh), mesh)
            loss.backward()
            longseq.sync_gradients(sharded, mesh)
            ref = dict(reference.named_parameters())
            error = max((p.grad - ref[n].grad).abs().max().item() / ref[n].grad.abs().max().item()
                        for n, p in sharded.named_parameters())
            report(results, f"linear attention {family} {mode} u={mesh.ulysses} r={mesh.ring} {dtype}",
                   max(error, abs(loss.item() - ref_loss.item())), 1e-3 if dtype == torch.float32 else 5e-2)
