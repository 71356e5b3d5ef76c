"""LLM backbone: one generic wrapper over AutoModelForCausalLM plus a per-family quirk table."""
from lvlm.models.llm.wrapper import LanguageModel, build_llm

__all__ = ["LanguageModel", "build_llm"]
