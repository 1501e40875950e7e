"""Entry point for test_lora's 2-process run: test_lora.lora_sft under torchrun.

    python -m torch.distributed.run --nproc_per_node 2 tests/_dist_lora.py MODEL DATA OUT
"""

import sys

import torch

torch.set_num_threads(1)

from test_lora import lora_sft  # noqa: E402  (tests/ is this script's folder, so on sys.path)

if __name__ == "__main__":
    lora_sft(*sys.argv[1:4], grad_accum=1)
