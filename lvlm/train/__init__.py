"""Training: engine (the only DeepSpeed/torch.distributed user), stages, loop, checkpoints."""
