"""The vLLM plugin: only what runs inside vLLM's API server (and the launcher that starts it).

- `general_plugin.register`: the ``vllm.general_plugins`` entry point (registers `resolver`).
- `endpoint_plugin.SurgeryEndpointPlugin`: the ``vllm.endpoint_plugins`` entry point; its start-up wires
  everything below and the HTTP routes (`api`, one module per resource).
- `resolver` (which version a name serves), `hotswap` (changing it without a restart), `validation`
  (what this server can serve), `auth` (the admin token), `capture` (recording traffic),
  `automatic_jobs` (jobs without a person, pending swaps), `metrics`.
- `launcher.main`: the ``vllm-surgery-serve`` console script.
- `vllm_compat`: every access to vLLM, the only module of the project that imports it.

Storage, traffic and the worker live in `vllm_surgery.storage`, `vllm_surgery.traffic` and
`vllm_surgery.worker` and never import vLLM. Nothing outside this package imports it (vLLM loads the
two entry points by their module paths), so this front door exports nothing; importing the package
stays free, as it must: vLLM calls the general plugin in every process it starts.
"""

__all__: list[str] = []
