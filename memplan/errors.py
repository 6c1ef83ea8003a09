"""The two error families: what the user gave us is wrong, or memplan broke its own rules."""


class MemplanError(Exception):
    """Base of every error memplan raises on purpose."""


class BudgetError(MemplanError, ValueError):
    """The budget is malformed: the message lists the accepted forms."""


class InfeasibleBudgetError(MemplanError):
    """No schedule fits the budget; ``minimum_bytes`` is the smallest peak any schedule reached."""

    def __init__(self, message: str, *, minimum_bytes: int):
        super().__init__(message)
        self.minimum_bytes = minimum_bytes


class CaptureError(MemplanError):
    """The model's training step could not be captured as one graph."""


class WorkerError(MemplanError, RuntimeError):
    """A worker process failed to compile a segment: the message says how to compile here."""


class InternalError(MemplanError, AssertionError):
    """An invariant of memplan itself does not hold: a bug, please report it."""
