"""The vLLM integration: a LoRA resolver that serves refined adapter versions, and its launcher.

Modules here may import vLLM; the rest of the package must not. `plugin.register` is the
`vllm.general_plugins` entry point; `launcher.main` is the `vllm-surgery-serve` console script.
"""
