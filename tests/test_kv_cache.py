"""The preallocated KV cache gives the same generations and log-probs as transformers' DynamicCache."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from thinkvl.rollout import hf_engine
from thinkvl.rollout.cache import PreallocatedLayer, fill_holes_order, in_place_ok, preallocated_cache
from thinkvl.rollout.engine import SamplingParams
from thinkvl.rollout.hf_engine import HFEngine

from test_packing import conversations


def test_layer_writes_in_place_grows_and_selects_rows():
    layer = PreallocatedLayer(capacity=4)
    k = torch.arange(2 * 1 * 3 * 2, dtype=torch.float32).view(2, 1, 3, 2)
    keys, values = layer.update(k, -k)
    buf = layer._k
    assert keys.shape == (2, 1, 3, 2) and torch.equal(keys, k) and torch.equal(values, -k)
    k2 = torch.full((2, 1, 1, 2), 7.0)
    keys, _ = layer.update(k2, -k2)
    assert layer._k is buf  # fourth position: written into the room, no new buffer
    assert torch.equal(keys, torch.cat([k, k2], dim=2)) and layer.get_seq_length() == 4
    keys, _ = layer.update(k2 + 1, -k2)  # past the room: the buffer doubles, contents kept
    assert layer._k.shape[2] == 8 and torch.equal(keys[:, :, :4], torch.cat([k, k2], dim=2))
    layer.batch_select_indices(torch.tensor([1, 1, 0]))
    assert keys.shape[0] == 2 and layer.keys.shape == (3, 1, 5, 2)
    assert torch.equal(layer.keys[0], layer.keys[1]) and torch.equal(layer.keys[2, :, :3], k[0])
    layer.crop(-2)
    assert layer.get_seq_length() == 3 and torch.equal(layer.keys[2], k[0])


def test_dropping_rows_compacts_in_place():
    layer = PreallocatedLayer(capacity=6)
    k, v = torch.randn(5, 2, 4, 3), torch.randn(5, 2, 4, 3)
    layer.update(k, v)
    ptr = layer._k.data_ptr()
    for keep, expect in (([0, 2, 3, 4], [0, 2, 3, 4]), ([1, 3], [2, 4]), ([0], [2])):
        layer.batch_select_indices(torch.tensor(keep))
        assert layer._k.data_ptr() == ptr  # the same buffer: kept rows moved up, nothing gathered
        assert torch.equal(layer.keys, k[expect]) and torch.equal(layer.values, v[expect])
    new = torch.randn(1, 2, 1, 3)
    keys, values = layer.update(new, -new)  # decoding goes on in the compacted buffer
    assert torch.equal(keys, torch.cat([k[[2]], new], 2)) and torch.equal(values, torch.cat([v[[2]], -new], 2))
    layer.batch_select_indices(torch.tensor([], dtype=torch.long))
    assert layer.keys.shape[0] == 0


def test_holes_are_filled_from_the_tail():
    assert fill_holes_order([0, 1, 2, 4, 5, 6, 7, 8, 9]) == [0, 1, 2, 9, 4, 5, 6, 7, 8]  # one row moves
    assert fill_holes_order([1, 3]) == [3, 1] and fill_holes_order([0, 1]) == [0, 1] and fill_holes_order([]) == []
    assert in_place_ok([0, 1, 2, 9, 4, 5, 6, 7, 8], 10) and in_place_ok([0, 2, 3], 4)
    assert not in_place_ok([1, 1, 0], 3)  # repeats (a prompt's samples) gather into a new buffer
    assert not in_place_ok([2, 0], 3)  # row 0 would be read after row 0 was overwritten
    assert not in_place_ok([0, 3], 3)  # no such row
    layer = PreallocatedLayer(capacity=6)
    k = torch.randn(6, 2, 3, 4)
    layer.update(k, -k)
    ptr = layer._k.data_ptr()
    order = fill_holes_order([0, 2, 4, 5])  # rows 1 and 3 finished
    assert order == [0, 4, 2, 5]
    layer.batch_select_indices(torch.tensor(order))
    assert layer._k.data_ptr() == ptr and torch.equal(layer.keys, k[order]) and torch.equal(layer.values, -k[order])


def test_engine_matches_dynamic_cache(vlm, images, monkeypatch):
    loaded, model = vlm, vlm.model
    prompts = [loaded.render(c[:1], add_generation_prompt=True) for c in conversations(images, "image")]
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=3)
    model.eval()
    try:
        with torch.no_grad():
            ours = HFEngine(loaded, batch_size=6).generate(prompts, 2, params)
            assert isinstance(preallocated_cache(model.config, 8).layers[0], PreallocatedLayer)
            monkeypatch.setattr(hf_engine, "preallocated_cache", lambda config, capacity: DynamicCache(config=config))
            ref = HFEngine(loaded, batch_size=6).generate(prompts, 2, params)
    finally:
        model.train()
    flat_o, flat_r = [r for g in ours for r in g], [r for g in ref for r in g]
    assert len({r.length for r in flat_r}) > 1  # some rows finish early and leave the batch
    assert [r.response_ids for r in flat_o] == [r.response_ids for r in flat_r]
    diff = max(abs(a - b) for o, r in zip(flat_o, flat_r) for a, b in zip(o.logprobs, r.logprobs))
    assert diff < 1e-5, diff
