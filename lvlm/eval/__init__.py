"""Downstream evaluation of trained checkpoints (no DeepSpeed; the model is rebuilt from the run's config).

``toy_vqa``: the toy world's held-out VQA benchmark (colour, shape, count, position), exact match.
"""
