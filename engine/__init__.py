"""The model side and the step loop; `LLM` is the offline entry point."""

from engine.config import EngineConfig
from engine.runtime.llm import LLM
from engine.runtime.llm_engine import LLMEngine
from engine.runtime.outputs import CompletionOutput, KVUsage, RequestMetrics, RequestOutput
from engine.runtime.sampling_params import SamplingParams
from engine.runtime.structured_output import StructuredOutputsParams

__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineConfig",
    "KVUsage",
    "LLMEngine",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
    "StructuredOutputsParams",
]
