"""Training: configuration, the loop, EMA, checkpoints and distributed data parallelism."""
