"""User-facing errors. The CLI prints ``error: <message>`` and exits with status 2 for these.

Raise them for anything a user can fix (a path, a setting, a corrupt file); let genuine bugs
surface as ordinary exceptions with a traceback.
"""


class CiscrError(Exception):
    """Base class: a problem with the user's input, reported as one line."""


class ConfigError(CiscrError):
    """An unknown key, a wrong type or an out-of-range value in a config or override."""


class DataError(CiscrError):
    """A missing, unreadable or inconsistent image, mask or split list."""


class WeightsError(CiscrError):
    """A missing or mismatching pretrained weight file."""


class CheckpointError(CiscrError):
    """A missing, truncated or incompatible checkpoint."""


class TrainingError(CiscrError):
    """Training cannot go on (e.g. the loss became NaN/inf)."""


class DependencyError(CiscrError):
    """An optional dependency (a pip extra such as ``ciscr[onnx]``) is not installed."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training, carrying what rerunning the same command will do (one line)."""
