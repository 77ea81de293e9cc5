"""Errors for people: one base class, a few kinds.

Every message says what failed, the bad value, the context and the fix. The CLI maps
:class:`InputError` (and its subclasses) to exit code 2 and anything else to 1.
"""
from __future__ import annotations


class ActscopeError(Exception):
    """Base class of every error actscope raises on purpose."""


class InputError(ActscopeError):
    """The user's input (a path, a name, an option, the data) cannot be used as given."""


class ModelLoadError(InputError):
    """A model could not be loaded from what the user pointed at."""


class SiteError(InputError):
    """A site selection names something the model does not have."""


class DataError(InputError):
    """A data source is missing, unreadable, empty or in an unsupported format."""


class RunDirError(InputError):
    """A run directory is missing, incomplete or not an actscope run."""


class MemoryGuardError(InputError):
    """Capturing would keep more activation memory than the user allowed."""
