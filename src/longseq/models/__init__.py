"""Hugging Face causal LMs: where their parts are, and the one call that prepares them.

    anatomy.py  the CausalLM (through a PEFT wrapper), its decoder layers, MLPs and norms (used by memory/, train/)
    apply.py    longseq.apply: sequence-parallel attention, then the memory features, then the loss entry point
    hybrid.py   Gated DeltaNet layers (Qwen3-Next, Qwen3.5, OLMo-Hybrid) through parallel/linear_attention.py
"""
