"""lvlm: reproducible LVLM pre-training with MIR built in."""
__version__ = "0.1.0"
