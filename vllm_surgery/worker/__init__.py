"""The worker: `vllm-surgery worker`, the process that runs refinement jobs beside vLLM (it never
imports vLLM), and the job spec that the server writes and the worker reads.

- `job_spec`: what a job asks for (`job_spec`, `spec_config`, `records_sha256`).
- `process`: the worker itself (`RefinementWorker`), its options and its command line.

This module is the package's front door: other packages import from here, not from the modules.
"""

from __future__ import annotations

from .job_spec import (
    CALIBRATION_SOURCES,
    DEFAULT_JOB_POLICY,
    JOB_LIMITS,
    check_job_settings,
    job_config,
    job_spec,
    records_sha256,
    spec_config,
)
from .process import (
    DESCRIPTION,
    SIZING_HELP,
    JobCancelled,
    RefinementWorker,
    ServerUnreachable,
    WorkerOptions,
    WorkerStopped,
    add_arguments,
    check_server,
    out_of_memory_message,
    run_from_args,
)

__all__ = [
    "CALIBRATION_SOURCES",
    "DEFAULT_JOB_POLICY",
    "DESCRIPTION",
    "JOB_LIMITS",
    "SIZING_HELP",
    "JobCancelled",
    "RefinementWorker",
    "ServerUnreachable",
    "WorkerOptions",
    "WorkerStopped",
    "add_arguments",
    "check_job_settings",
    "check_server",
    "job_config",
    "job_spec",
    "out_of_memory_message",
    "records_sha256",
    "run_from_args",
    "spec_config",
]
