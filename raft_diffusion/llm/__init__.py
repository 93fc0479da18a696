"""RAFT for causal language models: seeded batched sampling, discard filters, KL-regularised ranking key,
response-only LoRA (or full) fine-tuning, held-out evaluation and an HTML report, over the shared core.

Entry points: ``LLMConfig`` (config), ``LLMTask`` (the RaftTask), ``add_llm_parser`` (CLI).
Heavy imports (transformers, peft) happen when a task is built.
"""

from .config import LLMConfig

__all__ = ["LLMConfig", "LLMTask", "add_llm_parser"]


def __getattr__(name):
    if name == "LLMTask":
        from .task import LLMTask

        return LLMTask
    if name == "add_llm_parser":
        from .cli import add_llm_parser

        return add_llm_parser
    raise AttributeError(name)
