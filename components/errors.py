"""One small exception family: every message says what went wrong, where, and what to do."""


class CitysegError(Exception):
    """Base class for errors that the pipeline reports to users."""


class ConfigError(CitysegError, ValueError):
    """A configuration file or override is invalid; the message names the field."""


class DataError(CitysegError):
    """The dataset is missing, incomplete or malformed; the message names the file."""


class DownloadError(CitysegError):
    """Fetching the dataset failed (offline, bad credentials, bad checksum)."""


class ModelError(CitysegError):
    """A model or checkpoint cannot be built or loaded."""


class DeviceError(ModelError):
    """The requested device cannot run the model (``device=cuda`` without a usable GPU); the message
    lists what is missing."""


class CheckpointError(ModelError):
    """A checkpoint file is truncated, corrupt or incompatible."""


class ExportError(CitysegError):
    """ONNX export failed or was rejected by the parity gate."""


class RegistryError(CitysegError):
    """Registering or promoting a model in MLflow failed."""


class StorageError(CitysegError):
    """Reading or writing a local path or s3:// URI failed."""


MLFLOW_NOT_FOUND_CODES = frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"})
"""MLflow error codes that mean "no such model, version or alias" (as opposed to "unreachable")."""
