"""The exceptions users can catch: each names the file, line or tensor at fault."""


class SurgeryError(Exception):
    """Base class: anything vllm-surgery refuses or cannot do."""


class AdapterError(SurgeryError, ValueError):
    """An adapter directory that is missing, unsafe (pickles), malformed or of an unsupported variant."""


class CalibrationError(SurgeryError, ValueError):
    """Calibration data that cannot be used; the message names the file and line."""


class ConfigError(SurgeryError, ValueError):
    """Surgery settings that contradict each other or the adapter."""


class DeviceMemoryError(SurgeryError, MemoryError):
    """Not even one calibration example fits in the device's memory; the message says what to change."""
