"""A term of the memory model (a tensor or group of tensors alive at some moment) and the peak they add up to."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Term:
    """A tensor (or group of them) alive at some moment: bytes per token the rank holds, plus fixed bytes."""

    name: str
    group: str
    per_token: float = 0.0
    fixed: float = 0.0

    def bytes(self, tokens: int) -> float:
        return self.per_token * tokens + self.fixed


@dataclass
class Peak:
    """The largest moment of a step and what is alive then."""

    moment: str
    terms: list[Term]
    tokens: int

    @property
    def bytes(self) -> float:
        return sum(t.bytes(self.tokens) for t in self.terms)

    def by_group(self) -> dict[str, float]:
        groups: dict[str, float] = {}
        for term in self.terms:
            groups[term.group] = groups.get(term.group, 0.0) + term.bytes(self.tokens)
        return groups
