"""longseq plan: the memory and time model of a training step, and the search for the fastest configuration that
fits (docs/plan.md). Pure Python: it runs without a GPU.

    from longseq.plan import Problem, Layout, Workload, machine_for, plan, load_shape
    result = plan(Problem(shape=load_shape("llama-8b"), layout=Layout(),
                          workload=Workload(length=131072, training="lora"), machine=machine_for("h200")))
    result.memory_config()
"""

from longseq.plan.card import Card, load_card
from longseq.plan.choice import Choice
from longseq.plan.errors import PlanError
from longseq.plan.planner import Plan, detect_machine, machine_for, plan, plan_for, plan_longest
from longseq.plan.problem import Layout, Machine, Problem, Workload
from longseq.plan.shapes import ModelShape, load_shape, shape_from_config

__all__ = [
    "Card", "Choice", "Layout", "Machine", "ModelShape", "Plan", "PlanError", "Problem", "Workload", "detect_machine",
    "load_card", "load_shape", "machine_for", "plan", "plan_for", "plan_longest", "shape_from_config",
]
