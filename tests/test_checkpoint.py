"""Checkpoints: the tiny model round-trips through plain transformers, and resume = uninterrupted."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import torch
from conftest import KIMI_SMALL, sft_config, write_png
from safetensors.torch import load_file

from thinkvl.models.tiny import CHAT_TEMPLATE, build_tiny
from thinkvl.train.sft import train

# Runs in a fresh interpreter: plain transformers only, nothing of thinkvl imported.
LOADER = textwrap.dedent("""
    import sys
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model_dir, work = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    text = open(work + "/prompt.txt").read()
    inputs = processor(text=[text], images=[Image.open(work + "/image.png").convert("RGB")], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
    assert not [m for m in sys.modules if m.split(".")[0] == "thinkvl"], "thinkvl was imported"
    torch.save({"inputs": dict(inputs), "logits": logits, "cls": type(model).__name__,
                "template": processor.chat_template}, work + "/loaded.pt")
""")


def test_hf_round_trip_in_plain_transformers(tiny_dir, tmp_path):
    model, processor = build_tiny(seed=0, **KIMI_SMALL)  # the same model save_tiny wrote
    model.eval()
    image = write_png(tmp_path / "image.png", (84, 56), (255, 0, 0))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many red circles?"}]}]
    text = processor.tokenizer.apply_chat_template(messages, chat_template=CHAT_TEMPLATE, tokenize=False,
                                                   add_generation_prompt=True)
    (tmp_path / "prompt.txt").write_text(text)
    from PIL import Image

    inputs = processor(text=[text], images=[Image.open(image).convert("RGB")], return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs, use_cache=False).logits
    (tmp_path / "loader.py").write_text(LOADER)
    proc = subprocess.run([sys.executable, str(tmp_path / "loader.py"), str(tiny_dir), str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "loaded.pt", weights_only=False)
    assert got["cls"] == "Kimi_K25ForConditionalGeneration"
    assert got["template"] == CHAT_TEMPLATE
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == 6  # 84x56 px -> 3x2 tokens
    for k in ("input_ids", "pixel_values", "image_grid_thw"):
        assert torch.equal(got["inputs"][k], inputs[k]), k
    diff = float((got["logits"] - expected).abs().max())
    print(f"round-trip logits max diff {diff:.1e}")
    assert got["logits"].shape == expected.shape
    assert diff <= 1e-6


def metrics(run_dir) -> list[dict]:
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [m for m in lines if "loss" in m]


def test_resume_equals_uninterrupted(tiny_dir, sft_data, tmp_path):
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    train(sft_config(tiny_dir, sft_data, full_dir, save_every=3))
    full = metrics(full_dir)
    n = len(full)
    stages = [m["stage"] for m in full]
    assert n >= 7 and stages[0] == "s1" and stages[-1] == "s2", stages  # the resume crosses a stage

    # Interrupted after step 5 with checkpoints at 3 and 5; the step-5 checkpoint is lost (a crash
    # while writing it), so the second run resumes at 3 and must replace the logged steps 4 and 5.
    train(sft_config(tiny_dir, sft_data, cut_dir, save_every=3, max_steps=5))
    assert sorted(p.name for p in (cut_dir / "checkpoints").iterdir()) == ["step-3", "step-5"]
    shutil.rmtree(cut_dir / "checkpoints" / "step-5")
    train(sft_config(tiny_dir, sft_data, cut_dir, save_every=3, resume=True))
    cut = metrics(cut_dir)

    assert [m["step"] for m in cut] == list(range(1, n + 1))  # no duplicates, no gaps
    print("losses full", [m["loss"] for m in full])
    assert [m["loss"] for m in cut] == [m["loss"] for m in full]
    assert [m["lr"] for m in cut] == [m["lr"] for m in full]
    assert [m["grad_norm"] for m in cut] == [m["grad_norm"] for m in full]
    a = load_file(full_dir / "final" / "model.safetensors")
    b = load_file(cut_dir / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # ... and the weights did move from the initial ones
    init = load_file(tiny_dir / "model.safetensors")
    assert any(not torch.equal(a[k], init[k]) for k in init)
    # each run's log holds only its own lines
    log = (cut_dir / "train.log").read_text()
    assert log.count("resumed from") == 1 and "step-3" in log
    assert "resumed" not in (full_dir / "train.log").read_text()


def test_export_writes_sharded_safetensors_that_transformers_loads(tmp_path):
    from transformers import AutoModelForImageTextToText

    from thinkvl.models.load import wrap
    from thinkvl.train.common import RunDir
    from thinkvl.train.distributed import Dist

    model, processor = build_tiny(seed=0, **KIMI_SMALL)
    one = RunDir(tmp_path / "one", Dist()).export(wrap(model, processor), model)
    run = RunDir(tmp_path / "sharded", Dist())
    (run.path / ".tmp-final").mkdir()  # a crashed export's leftover is replaced, not merged
    (run.path / ".tmp-final" / "junk.safetensors").write_text("x")
    final = run.export(wrap(model, processor), model, max_shard_size="200KB")
    shards = sorted(p.name for p in final.glob("*.safetensors"))
    index = json.loads((final / "model.safetensors.index.json").read_text())
    print(shards)
    assert len(shards) >= 3 and sorted(set(index["weight_map"].values())) == shards
    assert not (run.path / ".tmp-final").exists()
    whole = load_file(one / "model.safetensors")  # the unsharded export: the same tensors
    parts = {k: v for name in shards for k, v in load_file(final / name).items()}
    assert parts.keys() == whole.keys() and all(torch.equal(parts[k], whole[k]) for k in whole)
    back = AutoModelForImageTextToText.from_pretrained(final)
    sd = model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in back.state_dict().items())
