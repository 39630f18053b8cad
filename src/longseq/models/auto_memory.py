"""`longseq.apply(model, mesh, "auto")`: the planner's memory features, chosen for each batch shape the model sees.

Note [Automatic memory]
~~~~~~~~~~~~~~~~~~~~~~~
longseq.apply installs every wrapper once (tiled MLP, tiled and fused norms, checkpoint offload with its attention
cache; on one GPU with SDPA, longseq's attention function), all reading one MemoryConfig object, the model's
`LongseqState.memory`, at each call. A forward pre-hook on the CausalLM reads the batch's shape: sequences, the
global length (local length × sp) and the longest packed document (the largest position id + 1, the maximum over
the sp group, so every rank of a sequence plans the same problem), asks the planner (plan_for) for the fastest
configuration that fits, forces the fields the caller fixed, and writes the result into that object before the
forward starts. Plans are cached per shape, so a repeated shape costs a dictionary look-up and, for the longest
document, one small all-reduce (sp > 1) and one device sync.

What the plan switches off does not run: each wrapper reads its field first and calls the module's own forward
(no tiles, no checkpoint, nothing offloaded); the loss is untiled; with no outputs kept on one GPU the attention
function hands a one-document-per-row batch to the model's own SDPA (parallel/attention.py). Head groups, tile
sizes and placements are read at call time too; the offloader takes its settings and host budget from the config
between steps (CheckpointOffloader.configure; a lowered budget bounds what the host arena holds, not its chunks).

A configuration changes at the start of a forward only. A backward runs with the settings its forward ran with, so a
forward of one shape must be followed by its backward before a forward of another shape (the ordinary training
loop, with or without gradient accumulation); forwards without gradients (evaluation) may come between.

Fixed at apply time, on the side that is safe: which wrappers exist (a field forced off installs none); the CUDA
allocator's expandable segments (set before CUDA allocates); FSDP2's CPU offload (fixed when the model is sharded:
the plan is told it, `fsdp_cpu_offload`). Models the planner cannot model (a mixture-of-experts family or a layer
type plan/families.py does not know) are refused at apply time, naming the fix (an explicit MemoryConfig).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist

from longseq.memory.config import MemoryConfig
from longseq.plan.errors import PlanError
from longseq.plan.planner import detect_machine, plan_for
from longseq.plan.problem import TRAINING, Machine
from longseq.plan.shapes import shape_from_config
from longseq.state import LongseqState, longseq_state

LORA_SHARE = 0.1  # at most this share of parameters trainable: frozen base weights with adapters ("lora")
_FIELDS = tuple(f.name for f in dataclasses.fields(MemoryConfig))


@dataclass(kw_only=True, init=False)
class AutoMemory:
    """Memory features chosen by the planner for each batch shape (Note [Automatic memory]).

    AutoMemory(machine=None, training=None, fsdp_cpu_offload=False, **overrides): overrides are MemoryConfig fields
    forced to the value given, whatever the plan picks (e.g. AutoMemory(tiled_loss=False))."""

    machine: Machine | None = None
    """The GPU and host to plan for (longseq.plan.machine_for(...)); None: detect_machine() (CUDA only)."""
    training: str | None = None
    """'full', 'lora' or 'forward-backward' (plan/problem.py Workload.training); None: from the model
    (infer_training)."""
    fsdp_cpu_offload: bool = False
    """training='full': whether FSDP2 keeps the sharded state on the host (the trainer's training.cpu_offload)."""
    compute_dtype: torch.dtype | None = None
    """The dtype activations are computed in (the trainer's mixed precision); None: the input embeddings' dtype."""
    overrides: dict
    """MemoryConfig fields forced to these values (offload_min_bytes is planned with)."""

    def __init__(self, *, machine: Machine | None = None, training: str | None = None, fsdp_cpu_offload: bool = False,
                 compute_dtype: torch.dtype | None = None, **overrides):
        unknown = sorted(set(overrides) - set(_FIELDS))
        if unknown:
            raise ValueError(f"AutoMemory({', '.join(unknown)}=...): not MemoryConfig fields; overrides are any of "
                             f"{', '.join(_FIELDS)}.")
        if training is not None and training not in TRAINING:
            raise ValueError(f"AutoMemory(training={training!r}): choose one of {', '.join(TRAINING)}, or None to "
                             "infer it from the model.")
        MemoryConfig(**overrides)  # checks the values
        self.machine, self.training, self.fsdp_cpu_offload = machine, training, fsdp_cpu_offload
        self.compute_dtype = compute_dtype
        self.overrides = dict(overrides)

    def installed(self) -> MemoryConfig:
        """The config apply installs the wrappers with: every feature on, except those forced off."""
        return MemoryConfig(**self.overrides)


def infer_training(model) -> str:
    """'lora' where at most LORA_SHARE of the parameters train (frozen base weights, adapters), else 'full' (every
    weight trained with an optimizer: the planner's FSDP2 fp32 master weights and AdamW, which holds at least what a
    plain AdamW loop holds; pass training='forward-backward' when no optimizer state exists)."""
    total = trainable = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return "lora" if trainable <= LORA_SHARE * total else "full"


def resolve_machine(machine: Machine | None) -> Machine:
    if machine is not None:
        return machine
    if not torch.cuda.is_available():
        raise PlanError("longseq.apply(model, mesh, 'auto') plans for a GPU and this machine has no CUDA: pass "
                        "longseq.AutoMemory(machine=longseq.plan.machine_for('h200', gpu_memory_gib=..., "
                        "host_memory_gib=...)).")
    return detect_machine()


class AutoPlanner:
    """The pre-forward hook of Note [Automatic memory]: the plan of each batch shape, written into `state.memory`."""

    def __init__(self, causal, state: LongseqState, auto: AutoMemory):
        shape_from_config(causal.config)  # refuses what the planner cannot model now, not at the first forward
        self.state, self.config, self.auto = state, causal.config, auto
        self.machine = resolve_machine(auto.machine)
        self.training = auto.training or infer_training(causal)
        dtype = auto.compute_dtype or causal.get_input_embeddings().weight.dtype
        self.dtype_bytes = torch.empty((), dtype=dtype).element_size()
        self.plans: dict[tuple, MemoryConfig | PlanError] = {}
        self.key: tuple | None = None

    def __call__(self, module, args, kwargs):
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs["inputs_embeds"]
        key = (tokens.shape[0], tokens.shape[1] * self.state.mesh.sp, self._longest_document(kwargs, tokens))
        if key != self.key:
            self._switch(key)

    def _longest_document(self, kwargs, tokens) -> int | None:
        """The largest position id + 1 over the sp group (positions restart at each document); None: one document
        per row, or no position_ids."""
        positions = kwargs.get("position_ids")
        if positions is None:
            return None
        longest = positions.max().reshape(1) + 1
        mesh = self.state.mesh
        if mesh.sp > 1:
            dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=mesh.sp_group)
        longest = int(longest.item())
        return None if longest >= tokens.shape[1] * mesh.sp else longest

    def _switch(self, key: tuple) -> None:
        if key not in self.plans:
            self.plans[key] = self._plan(key)
        chosen = self.plans[key]
        if isinstance(chosen, PlanError):
            raise PlanError(str(chosen)) from None
        live = self.state.memory
        for name in _FIELDS:
            setattr(live, name, getattr(chosen, name))
        if self.state.offloader is not None:
            self.state.offloader.configure(live)
        self.key = key

    def _plan(self, key: tuple) -> MemoryConfig | PlanError:
        batch, length, longest = key
        try:
            chosen = plan_for(self.config, self.state.mesh, (batch, length), self.machine, training=self.training,
                              longest_document=longest, dtype_bytes=self.dtype_bytes,
                              fsdp_cpu_offload=self.auto.fsdp_cpu_offload if self.training == "full" else None,
                              offload_min_bytes=self.state.memory.offload_min_bytes)
        except PlanError as error:
            return PlanError(f"longseq.apply(..., 'auto'): {error}")
        return dataclasses.replace(chosen, **self.auto.overrides)


def install_auto_memory(causal, state: LongseqState, auto: AutoMemory) -> None:
    """Register the planning hook on the CausalLM (after longseq.apply installed the wrappers with
    auto.installed()); the first forward plans."""
    state.auto_memory = AutoPlanner(causal, state, auto)
    causal.register_forward_pre_hook(state.auto_memory, with_kwargs=True)


def memory_config_in_use(model) -> MemoryConfig | None:
    """A copy of the MemoryConfig the model's memory features run with now: under "auto", the plan of the latest
    batch shape (None before the first forward); otherwise the one longseq.apply was given."""
    from longseq.models.anatomy import find_causal_lm

    state = longseq_state(find_causal_lm(model))
    if state is None or state.mesh is None:
        raise ValueError("memory_config_in_use: longseq.apply was not called on this model.")
    planner = state.auto_memory
    if state.memory is None or (planner is not None and planner.key is None):
        return None
    return dataclasses.replace(state.memory)
