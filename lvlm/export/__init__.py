"""Exporting trained lvlm checkpoints to other frameworks' formats (transformers LLaVA)."""
from lvlm.export.hf_llava import ExportError, check_exportable, export_llava

__all__ = ["ExportError", "check_exportable", "export_llava"]
