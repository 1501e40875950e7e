"""Entry point for test_distributed's loading test: under torchrun, a model that every rank loads whole
and then shards, and one that rank 1 builds on the meta device and gets its shards of from rank 0,
hold the same weights and buffers and give the same logits. Each rank writes OUT/rank-R.json.

    python -m torch.distributed.run --nproc_per_node 2 tests/_dist_meta_load.py MODEL OUT
"""

import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

from thinkvl.models.load import load  # noqa: E402
from thinkvl.train import distributed as D  # noqa: E402

if __name__ == "__main__":
    model_dir, out = sys.argv[1], Path(sys.argv[2])
    d = D.setup("cpu")
    eager = D.shard(load(model_dir).model, d).eval()  # every rank loads all of it, then shards
    lazy_loaded = load(model_dir, meta=not d.main)
    was_meta = all(p.is_meta for p in lazy_loaded.model.parameters())
    lazy = D.shard_from_rank0(lazy_loaded.model, d).eval()

    full_a, full_b = D.full_state_dict(eager, d), D.full_state_dict(lazy, d)  # rank 0 gets them
    buffers_b = dict(lazy.named_buffers())
    text = ["How many red circles?", "The answer is \\boxed{3}."][d.rank]
    ids = lazy_loaded.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits_a, logits_b = eager(input_ids=ids).logits, lazy(input_ids=ids).logits
    result = {
        "rank": d.rank,
        "built_on_meta": was_meta,
        "tensors": len(full_a),
        "weights_equal": full_a.keys() == full_b.keys() and all(torch.equal(full_a[k], full_b[k]) for k in full_a),
        "buffers": len(buffers_b),
        "buffers_equal": all(torch.equal(b, buffers_b[k]) for k, b in eager.named_buffers()),
        "logits_max_diff": float((logits_a - logits_b).abs().max()),
        "logits_equal": torch.equal(logits_a, logits_b),
    }
    (out / f"rank-{d.rank}.json").write_text(json.dumps(result))
    D.cleanup(d)
