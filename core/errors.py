"""Exceptions that the CLI turns into one clear message and a non-zero exit code."""


class RlmError(Exception):
    """Base class for errors a user can fix (bad input, unknown names, refused overwrites)."""


class ConfigError(RlmError):
    """A config file, ``--set`` override or flag failed validation; the message names the field."""


class UnknownPluginError(RlmError, KeyError):
    """A plugin name that no loaded plugin registered; the message lists the closest names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DuplicatePluginError(RlmError):
    """Two plugins registered the same name for the same kind; the message names both."""


class ModelError(RlmError):
    """A model path or file that cannot be used; the message names the path and, if known, the tensor."""
