"""Errors that name the user's problem. Each is a ValueError/RuntimeError so callers can catch broadly."""


class EfficientQATError(Exception):
    """Base class: every error this package raises on purpose."""


class ConfigError(EfficientQATError, ValueError):
    """A configuration value is invalid or inconsistent with the model."""


class DataError(EfficientQATError, ValueError):
    """Calibration or evaluation data is missing, unreadable or too short."""


class ModelLoadError(EfficientQATError, ValueError):
    """A model path is missing, unreadable, or not a model this tool can handle."""


class RunFolderError(EfficientQATError, RuntimeError):
    """An output folder holds another run, or a run folder is incomplete."""


class TrainingDivergedError(EfficientQATError, RuntimeError):
    """The loss became NaN or infinite."""
