"""The planner's one error type: a bad input or a budget nothing fits in, said in one line with the fix."""


class PlanError(ValueError):
    """A plan that cannot be made; the message names the input or the budget and what to change."""
