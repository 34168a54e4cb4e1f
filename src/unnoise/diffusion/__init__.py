"""The diffusion math: formulations, schedules, samplers and likelihood. Knows nothing of training or I/O."""
