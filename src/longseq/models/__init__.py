"""Hugging Face causal LMs: where their parts are, and the one call that prepares them.

    anatomy.py  the CausalLM (through a PEFT wrapper), its decoder layers, MLPs (dense and expert blocks), norms and
                attention sinks (used by memory/, train/)
    moe.py      mixture-of-experts families: their expert blocks tiled and reporting router statistics
    apply.py    longseq.apply: expert blocks, sequence-parallel attention, the memory features, the loss entry point
    hybrid.py   Gated DeltaNet layers (Qwen3-Next, Qwen3.5, OLMo-Hybrid) through parallel/linear_attention.py
"""
