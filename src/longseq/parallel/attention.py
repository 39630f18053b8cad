"""Sequence-parallel attention registered with transformers' attention interface.

The model keeps calling `ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`; longseq registers one function per
applied model that runs: Ulysses all-to-all (Note [Ulysses all-to-all]) → the whole sequence's attention on H/U heads
→ all-to-all back. The name is not in transformers' mask registry, so transformers builds no attention mask at all:
documents are read from position_ids instead (parallel/documents.py), once per forward pass.

Dispatch, on the gathered sequence (in this order):
1. longseq's block kernels (kernels.py, through ring.py over the ring group, as the one operator of Note [Attention as
   one operator] in attention_op.py): when ring > 1 (on SDPA or FlexAttention), for layers with attention sinks
   (GPT-OSS's `s_aux`, Note [Attention sinks]) on either, and with SDPA also when ring = 1, where the layer fits them
   (no sliding window, no dropout, half precision on CUDA). With ring = 1 there is no ring at all: one causal block
   per document, no exchange. Sliding windows cut the blocks (Note [Sliding windows on blocks]). They return the
   log-sum-exp, so the layer's output can be kept for backward: the operator passes the model's current attention
   cache (LongseqState.attention_cache) to them (Note [Attention output cache]).
2. flex_attention: the model's FlexAttention with a BlockMask of causal, same-document (and sliding-window) blocks.
3. sdpa (sliding windows, dropout, fp32 on CUDA): local.causal_attention, one SDPA call per document.
4. flash_attention_2/3: the model's own kernel, with position_ids restarting at each document (and this rank's
   heads' sinks, for the kernels transformers gives them to).
"""

from __future__ import annotations

import itertools
import weakref

import torch
import torch.distributed as dist
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from longseq.mesh import Mesh
from longseq.parallel import kernels
from longseq.parallel.attention_op import block_attention, register_state
from longseq.parallel.balance import natural_order
from longseq.parallel.documents import check_equal_slices, document_boundaries, is_single_document
from longseq.parallel.head_groups import HeadGroups
from longseq.parallel.local import causal_attention
from longseq.parallel.ulysses import heads_to_sequence_split, kv_replication, sequence_to_heads_split
from longseq.state import LongseqState

_NO_POSITIONS = ("Sequence-parallel attention needs position_ids (each rank holds a slice of the sequence, so "
                 "positions cannot be inferred). Pass the batch through longseq.shard_batch, which provides them.")
SUPPORTED = ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
# longseq's block kernels (kernels.py) for each attn_implementation they serve (ring attention runs only on these).
BLOCK_KERNELS = {"sdpa": "sdpa", "flex_attention": "flex"}
_names = itertools.count()


def check_implementation(implementation: str, ring: int) -> None:
    if implementation == "eager":
        raise ValueError(
            "attn_implementation='eager' materialises the full S×S attention matrix, which long sequences cannot "
            "afford, and has no sequence-parallel form. Load the model with attn_implementation='sdpa' "
            "(or 'flash_attention_2' where flash-attn is installed), or pass longseq.apply(..., attention='sdpa')."
        )
    if implementation not in SUPPORTED:
        raise ValueError(
            f"attn_implementation={implementation!r} is not supported by longseq; use one of {SUPPORTED}."
        )
    if ring > 1 and implementation not in BLOCK_KERNELS:
        raise ValueError(
            f"Ring attention runs on PyTorch's SDPA or FlexAttention kernels; load the model with "
            f"attn_implementation='sdpa' (or 'flex_attention') instead of {implementation!r}, or use pure Ulysses "
            "(longseq.init_mesh(sp=..., ring=1))."
        )
    _check_installed(implementation)


def _check_installed(implementation: str) -> None:
    """transformers' flash kernels need their package and a CUDA GPU; without them the forward would fail much later
    (a function registered under the name by the user is theirs to judge)."""
    from transformers.integrations.flash_attention import flash_attention_forward
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

    available = {"flash_attention_2": is_flash_attn_2_available, "flash_attention_3": is_flash_attn_3_available}
    if (implementation in available and ALL_ATTENTION_FUNCTIONS.get(implementation) is flash_attention_forward
            and not available[implementation]()):
        package = "flash-attn" if implementation == "flash_attention_2" else "flash-attn 3 (flash_attn_interface)"
        raise ValueError(
            f"attention={implementation!r} needs the {package} package and a CUDA GPU, and this environment lacks "
            f"one of them: install it (pip install flash-attn) on a CUDA machine, or use attention='sdpa'."
        )


class Documents:
    """The whole sequence's document boundaries, gathered once per forward pass and reused by every layer; and those
    of the batch the loss path placed (Note [Document placement]), kept apart so that another forward in between
    (e.g. logits) does not take them from that batch's backward."""

    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self._gathered = None  # (position_ids, version, boundaries)
        self._placed = None  # (position_ids, version, boundaries, layouts)
        self._block_masks = {}

    def place(self, position_ids: torch.Tensor, boundaries: list[list[int]], layouts) -> None:
        """Record the documents and per-row ring layouts (None: zigzag) of position_ids that
        data.shard.place_documents has placed: the layers of the forward pass (and their recompute in backward) read
        them instead of gathering."""
        self._placed = (position_ids, position_ids._version, boundaries, layouts)

    def __call__(self, position_ids: torch.Tensor | None) -> list[list[int]]:
        return self.lookup(position_ids)[0]

    @torch.compiler.disable  # host-side: Note [Attention as one operator]
    def lookup(self, position_ids: torch.Tensor | None) -> tuple[list[list[int]], list | None]:
        """The boundaries of the rows these position_ids belong to, and their ring layouts (None: zigzag)."""
        if position_ids is None:
            raise ValueError(_NO_POSITIONS)
        if self._is_placed(position_ids):
            return self._placed[2], self._placed[3]
        held = self._gathered
        if held is None or held[0] is not position_ids or held[1] != position_ids._version:
            self._gathered = (position_ids, position_ids._version, document_boundaries(self._gather(position_ids)))
            self._block_masks = {}
        return self._gathered[2], None

    def _is_placed(self, position_ids: torch.Tensor) -> bool:
        """The placed tensor itself, or (documents that moved, which gathering could not recover) one of equal
        values, as when compiled code passes another tensor object."""
        if self._placed is None:
            return False
        held, version, _, layouts = self._placed
        if held is position_ids:
            return version == position_ids._version
        return layouts is not None and held.shape == position_ids.shape and bool(torch.equal(held, position_ids))

    def block_mask(self, window: int | None, length: int, device):
        """FlexAttention's BlockMask for causal attention within documents (and a sliding window), per forward
        (the path without a ring, so of gathered documents)."""
        if window not in self._block_masks:
            self._block_masks[window] = document_block_mask(self._gathered[2], window, length, device)
        return self._block_masks[window]

    def _gather(self, position_ids: torch.Tensor) -> torch.Tensor:
        mesh = self.mesh
        if mesh.sp == 1:
            return position_ids
        check_equal_slices(position_ids, mesh.sp_group, mesh.sp)
        pieces = [torch.empty_like(position_ids) for _ in range(mesh.sp)]
        dist.all_gather(pieces, position_ids.contiguous(), group=mesh.sp_group)
        pieces = torch.stack(pieces)
        permuted = pieces.permute(1, 0, 2).flatten(1)
        return natural_order(permuted, mesh.ring)


def register_attention(state: LongseqState, mesh: Mesh, implementation: str, num_heads: int, num_kv_heads: int) -> str:
    """Register a sequence-parallel attention function over `mesh` for the model that keeps `state`, record its name
    and its document cache (which holds the mesh) in `state`, and return the name.

    transformers' registry is global and lives until the interpreter exits, so the function reaches the mesh only
    through a weak reference to the state kept on the model: the process groups go with the model. (Process groups
    alive at interpreter exit can abort it: gloo's worker threads may still hold work whose tensors need the
    interpreter.)
    """
    check_implementation(implementation, mesh.ring)
    replicate = kv_replication(num_heads, num_kv_heads, mesh.ulysses)
    state.documents = Documents(mesh)
    state_ref = weakref.ref(state)
    inner = ALL_ATTENTION_FUNCTIONS[implementation]

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        held = state_ref()
        if held is None:
            raise RuntimeError("longseq: this attention function belongs to a model that no longer exists.")
        documents = held.documents
        mesh = documents.mesh
        if kwargs.get("softcap") is not None:
            raise ValueError("longseq's SDPA-based attention does not support attention logit softcapping "
                             "(attn_logit_softcapping); set it to None in the config.")
        if getattr(module, "is_causal", True) is False:
            raise ValueError("longseq supports causal decoders only; this attention module is bidirectional.")
        if key.shape[2] != query.shape[2]:  # decoding with a KV cache
            if mesh.sp > 1:
                raise ValueError("Generation with a KV cache does not run sequence-parallel; generate with a model "
                                 "that longseq.apply did not shard (or load the trained weights into a plain one).")
            return inner(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        position_ids = kwargs.get("position_ids")
        if not torch.compiler.is_compiling():  # before the exchange: ranks of unequal slices raise, none hangs
            documents(position_ids)
        if _runs_own_sdpa(mesh, implementation, held.memory, documents, position_ids, kwargs.get("s_aux")):
            return inner(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
        q, k, v = heads_to_sequence_split(mesh.ulysses_group, query, key, value, replicate)
        window = kwargs.get("sliding_window")
        sinks = _local_sinks(kwargs.get("s_aux"), mesh, q.shape[1])
        if (mesh.ring > 1 or (sinks is not None and implementation in BLOCK_KERNELS)
                or (implementation == "sdpa" and _fits_block_kernels(q, window, dropout))):
            out = _block_attention(name, mesh, q, k, v, position_ids, scale, window, dropout,
                                   BLOCK_KERNELS[implementation], sinks, _head_groups(held.memory))
            return sequence_to_heads_split(mesh.ulysses_group, out), None
        boundaries = documents(position_ids)
        if implementation == "flex_attention":
            block_mask = documents.block_mask(window, q.shape[2], q.device)
            out, _ = inner(module, q, k, v, block_mask, scaling=scale, dropout=dropout,
                           kernel_options=kwargs.get("kernel_options"))
        elif implementation == "sdpa":
            out = causal_attention(q, k, v, scale=scale, boundaries=boundaries, sliding_window=window,
                                   dropout=dropout).transpose(1, 2)
        else:
            out, _ = inner(module, q, k, v, None, dropout=dropout, scaling=scale, sliding_window=window,
                           position_ids=_full_positions(boundaries, q.device), s_aux=sinks)
        return sequence_to_heads_split(mesh.ulysses_group, out), None

    name = f"longseq_sp_{next(_names)}"
    AttentionInterface.register(name, attention)
    register_state(name, state)
    state.attention = name
    return name


def _runs_own_sdpa(mesh: Mesh, implementation: str, memory, documents, position_ids, sinks) -> bool:
    """On one GPU, the model's own SDPA (causal, no mask) serves a batch of one document per row whose attention
    outputs are not kept: what a plain model runs. Only `longseq.apply(..., "auto")` reaches this with such a batch
    (an explicit MemoryConfig installs longseq's attention on one GPU only to keep outputs, or for sinks), when the
    plan for the batch's shape keeps no outputs (Note [Automatic memory] in models/auto_memory.py)."""
    keeps = memory is not None and memory.offload_checkpoints and memory.cache_attention
    return (mesh.sp == 1 and implementation == "sdpa" and sinks is None and not keeps
            and is_single_document(documents(position_ids)))


def _fits_block_kernels(q: torch.Tensor, window: int | None, dropout: float) -> bool:
    """Whether longseq's block kernels can compute this layer: no window, no dropout, and on CUDA half precision.
    They return the log-sum-exp, so the layer's output can be kept for backward (Note [Attention output cache])."""
    half = not q.is_cuda or q.dtype in kernels.CUDA_DTYPES
    return (window is None or window >= q.shape[2]) and not dropout and half


def _local_sinks(sinks: torch.Tensor | None, mesh: Mesh, heads: int) -> torch.Tensor | None:
    """The sink logits of the query heads this Ulysses rank holds after the exchange (heads are split in order)."""
    if sinks is None or sinks.shape[0] == heads:
        return sinks
    first = mesh.ulysses_rank * heads
    return sinks[first:first + heads]


def _head_groups(memory) -> HeadGroups:
    """The head grouping MemoryConfig asks of the block kernels (Note [Attention head groups]); all heads in one call
    without memory features."""
    if memory is None:
        return HeadGroups()
    return HeadGroups(heads=memory.attention_heads_per_call, memory_mib=memory.attention_memory_mib)


def _block_attention(name, mesh, q, k, v, position_ids, scale, window, dropout, kernel, sinks,
                     groups: HeadGroups) -> torch.Tensor:
    """longseq's block kernels over the ring group (ring = 1: one causal block per document, no ring), with the
    sliding window and sinks, as one operator (Note [Attention as one operator]); returns (B, S, H, D)."""
    if dropout:
        raise ValueError(
            "Ring attention and attention sinks run on longseq's block kernels, which do not support attention "
            "dropout; set attention_dropout=0 in the config (or evaluate with model.eval())."
        )
    if position_ids is None:
        raise ValueError(_NO_POSITIONS)
    window = window if window is not None and window < q.shape[2] * mesh.ring else None
    return block_attention(q, k, v, position_ids, name=name, scale=scale, kernel=kernel, window=window, sinks=sinks,
                           groups=groups)


def document_block_mask(boundaries: list[list[int]], window: int | None, length: int, device):
    """Causal, same-document (and q − k < window) BlockMask; O(S²/128²) to build, no S×S tensor."""
    from torch.nn.attention.flex_attention import create_block_mask

    document = torch.stack([
        torch.repeat_interleave(torch.arange(len(row) - 1, device=device), torch.tensor(row, device=device).diff())
        for row in boundaries
    ])

    def mask(b, h, q, k):
        allowed = (k <= q) & (document[b, q] == document[b, k])
        return allowed & (q - k < window) if window is not None else allowed

    return create_block_mask(mask, len(boundaries), None, length, length, device=device)


def _full_positions(boundaries: list[list[int]], device) -> torch.Tensor:
    """position_ids restarting at each document: what flash-attention kernels read packed documents from."""
    rows = []
    for row in boundaries:
        rows.append(torch.cat([torch.arange(e - s, device=device) for s, e in zip(row[:-1], row[1:])]))
    return torch.stack(rows)
