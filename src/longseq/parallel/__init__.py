"""Sequence-parallel attention: Ulysses all-to-all, ring, and their hybrid; and linear attention (Gated DeltaNet).

    attention.py  the entry point: the attention function registered with transformers, and its dispatch rule
    ulysses.py    Note [Ulysses all-to-all]: sequence-sharded ↔ head-sharded q, k, v and output
    ring.py       Note [Ring attention]: exact causal attention over a ring of ranks (R = 1: no ring), on
    kernels.py      block kernels that return the log-sum-exp (SDPA's cuDNN/flash ops, or FlexAttention),
    merge.py        merged exactly by log-sum-exp;
    window.py       Note [Sliding windows on blocks]: blocks a sliding window cuts, as fp32 bands
    sinks.py        Note [Attention sinks]: a learned per-head logit merged like one more key
    ring_plan.py    Note [Ring plan]: each rank's kernel calls per ring step, for packed documents and any layout
    varlen.py       Note [Variable-length blocks]: adjacent calls as one variable-length kernel call
    head_groups.py  Note [Attention head groups]: kernel calls over groups of heads
    balance.py    Note [Zigzag placement]: which chunks of the sequence each ring rank holds
    local.py      causal SDPA over a whole gathered sequence: per document, sliding windows without S×S masks
    documents.py  document boundaries from position_ids
    gradients.py  gradient averaging for runs without FSDP2/DDP
    linear_attention.py  Note [Linear attention under sequence parallelism]: heads (Ulysses) or state passing
    delta_rule.py        Note [Chunked gated delta rule]: the recurrence as affine maps per chunk of 64 tokens
    state_passing.py     Note [Linear attention state passing]: one all-gather of run maps, a prefix combine
    causal_conv.py       the depthwise causal convolution over packed documents, with halos

Depends on nothing else of longseq but mesh.py and state.py; ring.py and its kernels on nothing outside parallel/.
"""
