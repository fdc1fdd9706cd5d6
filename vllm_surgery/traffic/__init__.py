"""Traffic: from the requests an adapter answers to its calibration data, with no vLLM in it.

- `policy`: which adapters are recorded, at what sampling rate, and their retention.
- `redaction`: what is removed before a record is stored.
- `writer`: the bounded queue and writer thread (`TrafficWriter`) behind `TrafficRecorder`.
- `calibration_set`: the rules that turn records and feedback into calibration examples, the "adapter"
  calibration source of a job, and the JSONL export.
- `metrics`: the traffic series on /metrics.

The capture itself (the middleware that sees requests and responses inside vLLM) is
`vllm_surgery.serving.capture`; records are stored through `vllm_surgery.storage`. This module is the
package's front door: other packages import from here, not from the modules.
"""

from __future__ import annotations

from .calibration_set import (
    AdapterCalibration,
    CalibrationFromTraffic,
    adapter_source,
    build_adapter_calibration,
    calibration_set,
    export_calibration,
    parse_since,
    registered_files,
    write_jsonl,
)
from .metrics import record_feedback, record_traffic
from .policy import AdapterPolicy, TrafficPolicy
from .redaction import apply_redaction, builtin_redaction, load_redaction, redact_text
from .writer import TrafficRecorder, TrafficWriter

__all__ = [
    "AdapterCalibration",
    "AdapterPolicy",
    "CalibrationFromTraffic",
    "TrafficPolicy",
    "TrafficRecorder",
    "TrafficWriter",
    "adapter_source",
    "apply_redaction",
    "build_adapter_calibration",
    "builtin_redaction",
    "calibration_set",
    "export_calibration",
    "load_redaction",
    "parse_since",
    "record_feedback",
    "record_traffic",
    "redact_text",
    "registered_files",
    "write_jsonl",
]
