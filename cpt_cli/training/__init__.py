"""The training loop and the parts it calls: set-up, the step, checkpoints, optimizer, backend."""
