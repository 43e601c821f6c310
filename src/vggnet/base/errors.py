"""Errors vggnet raises for bad input.

Every error a user can cause derives from :class:`VggnetError`; the CLI turns them into one line on stderr and
exit status 2. Messages say what was expected, what was received and how to fix it.
"""


class VggnetError(Exception):
    """Base class of all user-facing vggnet errors."""


class ConfigError(VggnetError, ValueError):
    """A model name, architecture spec or option is invalid."""


class InputSizeError(VggnetError, ValueError):
    """An input tensor does not fit the model (too small, wrong channels, wrong rank)."""


class DataError(VggnetError):
    """A dataset is missing, corrupt, truncated or unsafe."""


class CheckpointError(VggnetError):
    """A run directory or checkpoint is missing, corrupt or of another version/architecture."""


class OutputError(VggnetError, OSError):
    """A file or folder could not be written (read-only place, full disk, a path through a file): an ``OSError``
    too, named after the path."""
