"""Entry point for test_precision's 2-process run: test_precision.precision_sft under torchrun.

    python -m torch.distributed.run --nproc_per_node 2 tests/_dist_precision.py MODEL DATA OUT PRECISION
"""

import sys

import torch

torch.set_num_threads(1)

from test_precision import precision_sft  # noqa: E402  (tests/ is this script's folder, so on sys.path)

if __name__ == "__main__":
    model_dir, data, out_dir, precision = sys.argv[1:5]
    precision_sft(model_dir, data, out_dir, precision, grad_accum=1)
