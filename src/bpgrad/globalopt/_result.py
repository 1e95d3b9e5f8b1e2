"""The result type of :func:`bpgrad.globalopt.minimize` and its status table."""

from __future__ import annotations

from enum import IntEnum
from typing import Any

__all__ = ["STATUS_MESSAGES", "SUCCESS_STATUSES", "OptimizeResult", "Status"]


class OptimizeResult(dict[str, Any]):
    """A dict with attribute access, shaped like ``scipy.optimize.OptimizeResult``.

    It does not need scipy: keys are read as attributes (``res.x``, ``res.fun``) or as items
    (``res["x"]``). ``repr`` lists the keys in insertion order, arrays abbreviated.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc

    def __dir__(self) -> list[str]:
        return list(self.keys())

    def __repr__(self) -> str:
        if not self:
            return f"{type(self).__name__}()"
        width = max(len(k) for k in self) + 1
        lines = []
        for key, value in self.items():
            text = repr(value)
            if "\n" in text or len(text) > 120:
                shape = getattr(value, "shape", None)
                text = f"<array of shape {shape}>" if shape is not None else text[:117] + "..."
            lines.append(f"{key.rjust(width)}: {text}")
        return "\n".join(lines)


class Status(IntEnum):
    """Why :func:`bpgrad.globalopt.minimize` stopped (``res.status``).

    The values are scipy-style integers; ``STATUS_MESSAGES`` is the one table of their messages.
    """

    GAP = 0
    COVERED = 1
    MAXFEV = 2
    MAXITER = 3
    CALLBACK = 4
    TARGET = 5
    NONFINITE = 6


# Positive codes ended the run normally; the table is the single source of the messages
# (``res.message`` starts with ``STATUS_MESSAGES[res.status]``).
STATUS_MESSAGES: dict[int, str] = {
    Status.GAP: "The gap between the best value and the lower bound is at most tol.",
    Status.COVERED: "The box is covered by pruning balls: no point can beat the pruning level f̂*.",
    Status.MAXFEV: "The maximum number of function evaluations (maxfev) was reached.",
    Status.MAXITER: "The maximum number of iterations (maxiter) was reached.",
    Status.CALLBACK: "The callback asked to stop.",
    Status.TARGET: "A value at or below f_target was found.",
    Status.NONFINITE: "No finite objective value was observed: every evaluation returned NaN or ±inf.",
}

# Statuses that count as success: the run ended because its goal was met, not because a budget
# ran out or someone interrupted it.
SUCCESS_STATUSES: frozenset[int] = frozenset({Status.GAP, Status.COVERED, Status.TARGET})
