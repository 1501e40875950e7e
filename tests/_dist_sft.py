"""Entry point for test_distributed: one SFT run, under torchrun or in a single process.

    python -m torch.distributed.run --nproc_per_node 2 tests/_dist_sft.py MODEL DATA OUT GRAD_ACCUM MAX_STEPS
"""

import sys

import torch

torch.set_num_threads(1)

from conftest import assert_models_released, sft_config  # noqa: E402  (tests/ is this script's folder, so on sys.path)

from thinkvl.train.sft import train  # noqa: E402

if __name__ == "__main__":
    model_dir, data, out_dir, grad_accum, max_steps = sys.argv[1:6]
    train(sft_config(model_dir, data, out_dir, save_every=2, max_steps=int(max_steps),
                     **{"optim.grad_accum": int(grad_accum)}))
    assert_models_released()
