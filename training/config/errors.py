"""The bottom of the config floor: the error every check raises and the list it collects.

Every problem is a :class:`Problem` keyed by the config key at fault (a later check of that key
is skipped: :meth:`Problems.blocks`); raised, they are one :class:`ConfigError` (a
``ValueError``) listing each with its key, the bad value and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A config problem found before any model is built. The message names key, value and fix."""


@dataclass(frozen=True)
class Problem:
    """One config problem: the key at fault (dotted, e.g. ``optimizer.lr``; empty when no
    single key is) and the message naming its value and the fix."""

    key: str
    message: str


@dataclass
class Problems:
    """Collects every problem of every phase so the user sees them all at once."""

    errors: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def error(self, message: str, key: str = "") -> None:
        self.errors.append(Problem(key, message))

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def blocks(self, key: str) -> bool:
        """True when a problem of ``key``, a key inside it or the node holding it was reported
        (a later check of ``key`` would only repeat it, or fail on the bad value)."""
        for problem in self.errors:
            a, b = sorted((problem.key, key), key=len)
            if a and (b == a or b.startswith((f"{a}.", f"{a}["))):
                return True
        return False

    def text(self, phase: str) -> str:
        """``N config problem(s) <phase>:`` and one ``  - message`` line per problem."""
        lines = "\n".join(f"  - {problem.message}" for problem in self.errors)
        return f"{len(self.errors)} config problem(s) {phase}:\n{lines}"

    def raise_if_any(self, phase: str) -> None:
        if self.errors:
            raise ConfigError(self.text(phase))
