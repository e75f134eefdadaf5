"""Errors the engine raises; each message says what went wrong and what to change."""


class TrainingError(RuntimeError):
    """Base class: a run that cannot go on."""


class ConfigError(TrainingError, ValueError):
    """A config field is unknown, of the wrong type or out of range."""


class DataError(TrainingError, ValueError):
    """Training data are malformed (the message names the row)."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


class OutOfMemoryError(TrainingError):
    """The device ran out of memory; the message names what to reduce."""


class RewardFunctionError(TrainingError):
    """A PPO/GRPO reward function raised or returned something that is not a number."""
