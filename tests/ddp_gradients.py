"""Run under torchrun (or alone): write rank 0's gradients after one training step's backward pass.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_gradients.py OUT.safetensors
    python tests/ddp_gradients.py OUT.safetensors

DDP averages the gradients of the processes' shards; with the same global batch they must equal the
single process's gradients.
"""

import sys

from safetensors.torch import save_file

from unnoise.train.config import TrainConfig
from unnoise.train.distributed import barrier, init_distributed, shutdown
from unnoise.train.loop import Run

config = TrainConfig(preset="tiny", batch_size=8, precision="fp32", out="/nonexistent", cond_dropout=0.25)
setup = init_distributed("cpu")
run = Run(config, setup, log=lambda *_: None)
run.backward(run.micro_batches(3))
if setup.is_main:
    grads = {name: p.grad for name, p in run.network.named_parameters() if p.grad is not None}
    save_file({k: v.contiguous() for k, v in grads.items()}, sys.argv[1])
barrier(setup)  # leave together, as train() does: a rank tearing gloo down alone sometimes aborted (SIGABRT)
shutdown(setup)
