"""The NormPropError family: every error the library raises on purpose.

Messages name the module or node path involved and say what to do about it.
"""

from __future__ import annotations


class NormPropError(Exception):
    """Base class of every error raised by normprop-fx."""


class UntraceableModelError(NormPropError):
    """torch.fx could not trace the model (data-dependent control flow, unsupported calls...)."""

    def __init__(self, message: str, *, module_path: str | None = None) -> None:
        super().__init__(message)
        self.module_path = module_path


class UnsupportedActivationError(NormPropError):
    """An activation name or parameter set that normprop-fx has no moments for."""


class InvalidOptionError(NormPropError):
    """A conversion option with a value outside what it accepts."""
