"""Exceptions that carry a message meant for the user: what is wrong and how to fix it."""


class MegaflowError(Exception):
    """An error the CLI reports as one clear line (no traceback) and exits non-zero."""


class ConfigError(MegaflowError):
    """A recipe, override or command-line value is invalid."""


class ModelLoadError(MegaflowError):
    """A model folder or one of its components is missing or unreadable."""


class DataError(MegaflowError):
    """A prompt file or other input data is missing, empty or malformed."""


class RewardError(MegaflowError):
    """A reward function raised or returned a non-finite or mis-shaped score."""
