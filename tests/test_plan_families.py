"""The plan's model of mixture-of-experts blocks, Gated DeltaNet layers and sliding windows: shapes read from the
families' configs, hand-checked arithmetic, refusals. (Their bytes against live tensors: tests/test_plan_measured.py.)

    PYTHONPATH=src python -m pytest -q tests/test_plan_families.py
"""

from __future__ import annotations

import pytest
import transformers

from longseq.plan.attention import keeps_output
from longseq.plan.choice import Choice
from longseq.plan.errors import PlanError
from longseq.plan.experts import tile_positions
from longseq.plan.families import LayerKind
from longseq.plan.footprint import footprint, layer_moments
from longseq.plan.linear import mixer_bytes
from longseq.plan.memory import effective, widths
from longseq.plan.planner import machine_for, plan
from longseq.plan.problem import Layout, Problem, Workload
from longseq.plan.shapes import shape_from_config
from longseq.plan.timing import layer_flops, step_time
from tests.models import HYBRID_FAMILIES, MOE_FAMILIES, tiny_model

H200 = machine_for("h200", gpu_memory_gib=79)
# Qwen3-30B-A3B's published config
QWEN3_30B = transformers.Qwen3MoeConfig(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                                        num_key_value_heads=4, head_dim=128, moe_intermediate_size=768,
                                        num_experts=128, num_experts_per_tok=8, vocab_size=151936)


def problem(shape, length=131072, training="forward-backward", **layout) -> Problem:
    return Problem(shape=shape, layout=Layout(**layout), workload=Workload(length=length, training=training),
                   machine=H200)


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES) + sorted(HYBRID_FAMILIES))
def test_parameters_and_layer_kinds_of_the_tiny_models(family):
    """Every parameter counted (experts, routers, biases, sinks, shared experts, Gated DeltaNet projections,
    convolutions and gates), and each layer's kind as transformers builds it."""
    model = tiny_model(family)
    shape = shape_from_config(model.config)
    assert shape.params == sum(p.numel() for p in model.parameters()), family
    built = []
    for layer in model.model.layers:
        attention = getattr(layer, "self_attn", None)  # Mixtral's reads its window from the config
        window = getattr(attention, "sliding_window", getattr(getattr(attention, "config", None), "sliding_window",
                                                               None))
        mixer = "linear" if hasattr(layer, "linear_attn") else "sliding" if window else "attention"
        stacked = any(p.dim() >= 3 for p in layer.mlp.parameters())  # experts' weights are stacked
        built.append(LayerKind(mixer=mixer, ffn="experts" if stacked else "dense"))
    assert shape.kinds == tuple(built)


def test_qwen3_30b_a3b_hand_checked():
    """Qwen3-30B-A3B (H 2048, 128 experts of I 768, top 8): 30.5 B parameters, 3.3 B active; its tiled block at
    256 MiB tiles 256 MiB / (8 · 768 · 3 · 2 B) = 7281 positions, each row k(5H + 4I)·2 + 4E + 2k·2 + 32k +
    the router's softmax gradient 4E and the tile's output (H·2): 214,848 B at the first tile."""
    shape = shape_from_config(QWEN3_30B)
    idle = 48 * (128 - 8) * 3 * 2048 * 768  # the experts a token does not go through
    assert (shape.params, shape.active_params) == (30_532_122_624, 30_532_122_624 - idle)
    p = problem(shape)
    assert tile_positions(p, Choice()) == 7281
    w = widths(p, effective(p, Choice()))
    moment = layer_moments(p, effective(p, Choice()), w, shape.kinds[0])["MLP backward"]
    tile = next(t for t in moment if t.name.startswith("expert tile"))
    per_row = 8 * (5 * 2048 + 4 * 768) * 2 + 4 * 128 + 2 * 8 * 2 + 32 * 8 + 4 * 128 + 2 * 2048 * 2
    sums = (128 * 3 * 2048 * 768 + 128 * 2048) * (4 + 2)
    assert "a later one" in tile.name and tile.fixed == 7281 * per_row + sums
    # only the active experts and the router count as FLOPs: 2 · (3 · H · k · I + H · E) per token
    assert layer_flops(p, shape.kinds[0])[2] == 2.0 * 131072 * (3 * 2048 * 8 * 768 + 2048 * 128)


def test_untiled_families_and_short_sequences_keep_the_expert_intermediates():
    """Qwen3-Next's blocks run as the model has them (longseq does not wrap them); a Qwen3-MoE block whose sequence
    fits one tile runs untiled too: both keep their intermediates for backward, which a tiled block does not."""
    qwen3_next = shape_from_config(transformers.Qwen3NextConfig())
    assert not qwen3_next.experts.tiled and qwen3_next.experts.shared_intermediate == 512
    names = {t.name for t in layer_moments(problem(qwen3_next), Choice(), widths(problem(qwen3_next), Choice()),
                                           qwen3_next.kinds[3])["MLP backward"]}
    assert any(n.startswith("expert block: routed copies") for n in names)
    assert any(n.startswith("shared expert") for n in names)
    short, long = problem(shape_from_config(QWEN3_30B), 4096), problem(shape_from_config(QWEN3_30B))
    assert not effective(short, Choice()).tiled_mlp and effective(long, Choice()).tiled_mlp


def test_gpt_oss_windows_bound_the_attention():
    """GPT-OSS's sliding layers (window 128) cost 4·a·(S·w − w²/2) FLOPs against the full layers' 2·a·S², run as
    bands whose chunk buffers do not grow with the sequence, and keep their outputs like the full layers."""
    shape = shape_from_config(transformers.GptOssConfig())
    sliding, full = shape.kinds[0], shape.kinds[1]
    assert (sliding.mixer, full.mixer, shape.sinks, shape.sliding_window) == ("sliding", "attention", True, 128)
    p = problem(shape)
    a, s = shape.attention_width, 131072
    assert layer_flops(p, full)[0] == 2.0 * s * s * a
    assert layer_flops(p, sliding)[0] == 4.0 * a * (s * 128 - 128 * 128 / 2)
    moments = [layer_moments(q, Choice(), widths(q, Choice()), sliding)["attention backward"]
               for q in (p, problem(shape, 4 * s))]
    assert [t.name for t in moments[0]] == [t.name for t in moments[1]]
    assert any(t.name.startswith("band dq, dk, dv") for t in moments[0])
    assert [t.fixed for t in moments[0]] == [t.fixed for t in moments[1]]  # nothing grows but per token
    assert keeps_output(p, sliding) and keeps_output(p, full)


def test_gated_deltanet_mixer_is_measured_per_token_and_head():
    """The mixer's bytes grow with dk²: per token and head they are the same at two and four chunks' difference
    as at four and eight (linear in tokens), and Qwen3-Next's layers are planned with them."""
    small, large = mixer_bytes(16, 8, 2, 4, 4), mixer_bytes(64, 64, 2, 4, 4)
    assert all(0 < s < l for s, l in zip(small, large))
    kept, forward, backward = large
    assert kept < forward and kept < backward
    shape = shape_from_config(transformers.Qwen3NextConfig())
    linear = next(k for k in shape.kinds if k.mixer == "linear")
    p = problem(shape, 65536)
    moments = layer_moments(p, Choice(), widths(p, Choice()), linear)
    assert {"linear attention backward", "linear attention recompute", "MLP backward"} <= set(moments)
    assert step_time(p, Choice()).components["linear attention"] > 0


def test_gated_deltanet_block_is_fixed_beyond_a_block():
    """One block of the rule's chunks (Note [Chunked gated delta rule], Blocks) is held at the mixer's peaks: in
    proportion to a row's tokens up to BLOCK_CHUNKS chunks, the same beyond."""
    from longseq.parallel.sizes import BLOCK_CHUNKS, CHUNK_TOKENS

    shape = shape_from_config(transformers.Qwen3NextConfig())
    linear = next(k for k in shape.kinds if k.mixer == "linear")
    block = BLOCK_CHUNKS * CHUNK_TOKENS

    def block_bytes(length):
        p = problem(shape, length)
        terms = layer_moments(p, Choice(), widths(p, Choice()), linear)["linear attention backward"]
        return next(t.fixed for t in terms if t.name.endswith("one block (measured)"))

    assert block_bytes(block // 2) == pytest.approx(block_bytes(block) / 2)
    assert block_bytes(block) == block_bytes(4 * block) == block_bytes(64 * block) > 0


def test_moe_and_hybrid_plans_fit_and_grow_with_memory():
    """A plan for each kind of model: the longest length grows with GPU memory (monotone), and the chosen
    configuration converts to a MemoryConfig."""
    from longseq.plan.planner import plan_longest

    for config in (QWEN3_30B, transformers.Qwen3NextConfig(), transformers.GptOssConfig(num_local_experts=32)):
        shape = shape_from_config(config).with_layers(4)  # shallow: the search is quick
        base = Problem(shape=shape, layout=Layout(sp=2), workload=Workload(length=1024, training="lora"),
                       machine=machine_for("h200", gpu_memory_gib=40, gpus_per_host=2))
        small = plan_longest(base)
        big = plan_longest(Problem(shape=shape, layout=base.layout, workload=base.workload,
                                   machine=machine_for("h200", gpu_memory_gib=79, gpus_per_host=2)))
        assert 0 < small.longest <= big.longest and big.memory_config() is not None
        assert footprint(big.problem, big.chosen.choice).gpu.bytes <= big.problem.machine.gpu_limit


def test_what_the_plan_cannot_model_is_refused_in_one_line():
    deepseek = {"model_type": "deepseek_v3", "n_routed_experts": 8, "hidden_size": 8, "num_hidden_layers": 2,
                "num_attention_heads": 2, "intermediate_size": 16, "vocab_size": 32}
    with pytest.raises(PlanError, match=r"^deepseek_v3: longseq plan models the mixture-of-experts blocks of "
                                        r".*memory.auto: false"):
        shape_from_config(deepseek)
    mamba = {"model_type": "falcon_h1", "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 16, "vocab_size": 32, "layer_types": ["mamba", "full_attention"]}
    with pytest.raises(PlanError, match=r"layer types \['mamba'\] are not modelled.*memory.auto: false"):
        shape_from_config(mamba)
    with pytest.raises(PlanError):
        plan(problem(shape_from_config(QWEN3_30B).with_layers(2), 1 << 24)).memory_config()


def test_reproduces_the_gpu_records_of_call_28():
    """Device call 28 (one H200, main 9710e3b; bench/results/bench_moe.jsonl): 4 layers of the real shapes, bf16
    weights and gradients resident, longseq's default MemoryConfig. The expert models' peaks within 3%; their step
    times within the 15% of issue 14 (2.8% seen: docs/plan.md). A card figure fitted to these records
    (expert_row_gelements_s on Qwen3-MoE 64K, band_tflops on GPT-OSS 64K, until calibrate.py measures them) is the
    fit bench/fit_moe_time.py makes. (Call 31's Qwen3-Next record is of the delta rule before its blocks, commit
    1999f9e: docs/plan.md; a new record is due.)"""
    from bench import fit_moe_time

    measured = {"qwen3_moe": (20.95, 25.23), "mixtral": (37.19, 40.99), "gpt_oss": (26.37, 29.85)}
    for family, peaks in measured.items():
        for length, peak in zip((65536, 131072), peaks):
            predicted = footprint(fit_moe_time.problem_of(family, length, H200.card), fit_moe_time.CHOICE)
            assert predicted.gpu.bytes / 2**30 == pytest.approx(peak, rel=0.03), (family, length)
    records = fit_moe_time.call_28()
    assert len(records) == 6
    refit = fit_moe_time.fit(H200.card, records)
    for field in fit_moe_time.FITS:
        if H200.card.sources[field].startswith("fitted: bench_moe.jsonl device call 28"):
            assert getattr(H200.card, field) == pytest.approx(getattr(refit, field), rel=1e-3), field
    for r in records:
        plan = fit_moe_time.as_run(r["family"], r["tokens"], H200.card)
        assert plan == pytest.approx(r["step_s"], rel=0.15), (r["family"], r["tokens"], plan, r["step_s"])


def test_expert_block_time_hand_checked():
    """Note [Expert block time] on Qwen3-30B-A3B's layers (H 2048, I 768, 128 experts, top 8) at 64K, one layer:
    the grouped GEMMs 2·s·H·(3kI + E) FLOPs at expert_gemm_tflops and s·k·(13H + 12I) row elements at
    expert_row_gelements_s, each twice in backward; tiled, the forward again per tile and in the checkpoint's
    recompute, and the fp32 sums over ⌈65536 / 7281⌉ = 10 tiles: 9 × (2 + 8) bytes plus 2 × (4 + 2) per weight."""
    shape = shape_from_config(QWEN3_30B).with_layers(1)
    p, card, s = problem(shape, 65536), H200.card, 65536
    gemms = 2.0 * s * 2048 * (3 * 8 * 768 + 128) / (card.expert_gemm_tflops * 1e12)
    rows = s * 8 * (13 * 2048 + 12 * 768) / (card.expert_row_gelements_s * 1e9)
    t = step_time(p, Choice()).components
    assert t["expert blocks (grouped GEMMs and routed rows)"] == pytest.approx(3 * (gemms + rows))
    assert t["MLP recomputed in its tiles"] == pytest.approx(gemms + rows)
    assert t["expert blocks: forward again in the layer's recompute"] == pytest.approx(gemms + rows)
    weights = 128 * 3 * 2048 * 768 + 128 * 2048
    assert t["expert weight gradients summed over tiles (fp32)"] == pytest.approx(
        weights * (9 * 10 + 2 * 6) / (card.memory_gib_s * 2**30))
    assert "tiled MLP overhead" not in t  # the dense MLP's measured overhead is not an expert block's
    frozen = step_time(problem(shape, 65536, training="lora"), Choice()).components
    assert frozen["expert blocks (grouped GEMMs and routed rows)"] == pytest.approx(2 * gemms + 3 * rows)
    assert "expert weight gradients summed over tiles (fp32)" not in frozen


def test_gpt_oss_rows_count_its_biases_and_clamped_glu():
    """GPT-OSS's routed row: the 13·H + 12·I of a SiLU expert, its clamped GLU's 11 more I-wide elements, and its
    biases gathered and added (10·I + 5·H): 18·H + 33·I."""
    from longseq.plan.experts import row_elements

    gpt_oss, qwen = shape_from_config(transformers.GptOssConfig()), shape_from_config(QWEN3_30B)
    assert row_elements(gpt_oss.experts, 2880) == 18 * 2880 + 33 * 2880
    assert row_elements(qwen.experts, 2048) == 13 * 2048 + 12 * 768


@pytest.mark.parametrize("length, rows, window", [(8, 2, 4), (300, 7, 16), (1000, 128, 128), (5, 8, 16)])
def test_band_pairs_are_the_chunks_window_py_runs(length, rows, window, monkeypatch):
    """band_pairs counts every chunk's rows against the keys it reaches, as window.py's chunks do (8 tokens,
    window 4, 2-row chunks, by hand: 2·2 + 2·4 + 2·5 + 2·5 = 32)."""
    import torch

    from longseq.parallel import window as code
    from longseq.plan.timing import band_pairs

    monkeypatch.setattr(code, "band_rows", lambda *args: rows)
    q = torch.empty(1, 1, length, 4, device="meta")
    ran = sum((i1 - i0) * (j1 - j0) for i0, i1, j0, j1 in code._row_chunks(q, length, 0, window))
    assert band_pairs(length, rows, window) == ran
    assert band_pairs(8, 2, 4) == 32


def test_gpt_oss_sliding_layers_are_timed_as_bands():
    """GPT-OSS's sliding layers at 64K run 128-row chunks (sizes.band_rows): 128·128 pairs in the first, 128·255 in
    each of the other 511; 2 matmuls forward and 5 backward over 64 heads of 64 at band_tflops."""
    shape = shape_from_config(transformers.GptOssConfig()).with_layers(2)
    p, card = problem(shape, 65536), H200.card
    pairs = 128 * 128 + 511 * 128 * 255
    seconds = (2 + 5) * 2.0 * pairs * 64 * 64 / (card.band_tflops * 1e12)
    t = step_time(p, Choice(attention_host_layers=2)).components
    assert t["attention: sliding-window bands (fp32)"] == pytest.approx(seconds)
