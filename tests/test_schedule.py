"""The two-stage warm-up + cosine schedule of Kimi-VL's joint SFT, checked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from thinkvl.train.schedule import Segment, lr_at

# Stage 1: 11 steps, 2 warm-up, 2e-5 -> 2e-6. Stage 2: 11 steps, 2 warm-up, re-warm to 1e-5 -> 1e-6.
# Cosine span per stage = 11 - 1 - 2 = 8 steps, so the midpoint is 4 steps after the peak.
S1 = Segment(steps=11, peak=2e-5, end=2e-6, warmup=2)
S2 = Segment(steps=11, peak=1e-5, end=1e-6, warmup=2)
SEGS = [S1, S2]


def test_stage_one():
    assert lr_at(0, SEGS) == pytest.approx(2e-5 / 3, rel=1e-12)  # linear from 0, exclusive
    assert lr_at(1, SEGS) == pytest.approx(2e-5 * 2 / 3, rel=1e-12)
    assert lr_at(2, SEGS) == 2e-5  # first step after warm-up = peak, exactly
    assert lr_at(6, SEGS) == pytest.approx((2e-5 + 2e-6) / 2, rel=1e-12)  # cosine midpoint: 1.1e-5
    # a quarter of the way: end + (peak - end) * (1 + cos(pi/4)) / 2
    assert lr_at(4, SEGS) == pytest.approx(2e-6 + 1.8e-5 * (1 + math.sqrt(0.5)) / 2, rel=1e-12)
    assert lr_at(10, SEGS) == 2e-6  # last step of stage 1, exactly
    values = [lr_at(s, SEGS) for s in range(11)]
    assert all(a < b for a, b in zip(values[:3], values[1:3]))  # rising while warming
    assert all(a > b for a, b in zip(values[2:], values[3:]))  # then strictly falling


def test_stage_two_rewarms_from_stage_one_end():
    assert lr_at(11, SEGS) == pytest.approx(2e-6 + (1e-5 - 2e-6) / 3, rel=1e-12)
    assert lr_at(12, SEGS) == pytest.approx(2e-6 + (1e-5 - 2e-6) * 2 / 3, rel=1e-12)
    assert lr_at(13, SEGS) == 1e-5
    assert lr_at(17, SEGS) == pytest.approx((1e-5 + 1e-6) / 2, rel=1e-12)
    assert lr_at(21, SEGS) == 1e-6  # final step
    assert lr_at(22, SEGS) == 1e-6  # past the end: stays at the final rate
    assert lr_at(500, SEGS) == 1e-6


def test_no_warmup_and_single_step_stages():
    segs = [Segment(steps=5, peak=1e-3, end=1e-4, warmup=0)]
    assert lr_at(0, segs) == 1e-3
    assert lr_at(2, segs) == pytest.approx(5.5e-4, rel=1e-12)
    assert lr_at(4, segs) == 1e-4
    # a warm-up as long as the stage is capped: the last step still lands on the final rate
    segs = [Segment(steps=3, peak=1e-3, end=1e-4, warmup=10)]
    assert [lr_at(s, segs) for s in range(3)] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-4], rel=1e-12)
    assert lr_at(0, [Segment(steps=1, peak=1e-3, end=1e-4, warmup=0)]) == 1e-4


def test_adamw_fused_matches_the_per_tensor_loop_and_falls_back():
    """`adamw` takes PyTorch's fused kernel for CPU float parameters: the same five steps as the
    per-tensor loop (hand-rolled Adam would only re-test torch), to float rounding, across two
    groups with different learning rates and weight decay; float64 falls back to the loop."""
    import torch

    from thinkvl.train.common import adamw

    def start() -> list:
        g = torch.Generator().manual_seed(0)
        return g, [torch.randn(7, 5, generator=g).requires_grad_(), torch.randn(11, generator=g).requires_grad_()]

    def run(fused: bool) -> list:
        g, ps = start()
        groups = [{"params": ps[:1], "lr": 1e-2, "weight_decay": 0.1}, {"params": ps[1:], "lr": 3e-3, "weight_decay": 0.0}]
        opt = adamw(groups, (0.9, 0.95)) if fused else torch.optim.AdamW(groups, betas=(0.9, 0.95), foreach=False)
        assert opt.defaults["fused"] is (True if fused else None)
        for _ in range(5):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        return ps

    for a, b, p0 in zip(run(True), run(False), start()[1]):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)
        assert (a - p0).abs().min() > 1e-5  # every entry moved (the two sides did not both stay put)
    p64 = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    assert adamw([{"params": [p64], "lr": 1e-3}], (0.9, 0.95)).defaults["fused"] is None


class Params(torch.nn.Module):
    """A module holding the given tensors as parameters p0, p1, ...: what a checkpoint saves."""

    def __init__(self, *tensors):
        super().__init__()
        for i, t in enumerate(tensors):
            self.register_parameter(f"p{i}", torch.nn.Parameter(t.clone()))


def round_trip(tmp_path, model, optim, model2, optim2):
    """Save (model, optim) as a thinkvl checkpoint and load it into (model2, optim2)."""
    from thinkvl.train import checkpoint as C
    from thinkvl.train import distributed as D

    d = D.setup("cpu")
    C.save(tmp_path / "ckpts", 1, model, optim, {}, keep=1, d=d)
    C.load(tmp_path / "ckpts" / "step-1", model2, optim2, d)


def test_resuming_a_loop_optimisers_checkpoint_keeps_the_fused_kernel(tmp_path):
    """A checkpoint written by the per-tensor loop optimiser (as before `adamw` chose the fused
    kernel) carries foreach=False/fused=None in its param groups; loading it keeps the fused
    kernel, and the moments and step count are the checkpoint's."""
    from thinkvl.train.common import adamw

    a = Params(torch.ones(4))
    old = torch.optim.AdamW([{"params": [a.p0], "lr": 0.1}], betas=(0.9, 0.95), foreach=False)
    a.p0.grad = torch.full((4,), 0.5)
    old.step()
    assert old.param_groups[0]["fused"] is None

    b = Params(a.p0.detach())
    new = adamw([{"params": [b.p0], "lr": 0.1}], (0.9, 0.95))
    round_trip(tmp_path, a, old, b, new)
    assert new.param_groups[0]["fused"] is True and new.param_groups[0]["foreach"] is None
    assert float(new.state[b.p0]["step"]) == 1.0
    assert torch.equal(new.state[b.p0]["exp_avg"], old.state[a.p0]["exp_avg"])
    b.p0.grad, a.p0.grad = torch.full((4,), 0.5), torch.full((4,), 0.5)
    new.step()
    old.step()
    assert torch.allclose(b.p0, a.p0, rtol=0, atol=1e-6)  # the same second step


def test_sgd_optimizer_is_heavy_ball_momentum_by_hand():
    """`make_optimizer(..., "sgd")`: v = mu * v + (g + wd * p); p -= lr * v, per group, computed by
    hand for three steps; an unknown name is a ConfigError naming the choices."""
    import torch

    from thinkvl.config import ConfigError
    from thinkvl.train.common import make_optimizer

    a, b = torch.nn.Parameter(torch.tensor([1.0, -2.0])), torch.nn.Parameter(torch.tensor([0.5]))
    opt = make_optimizer([{"params": [a], "lr": 0.1, "weight_decay": 0.0},
                          {"params": [b], "lr": 0.01, "weight_decay": 0.5}], "sgd", momentum=0.5)
    assert isinstance(opt, torch.optim.SGD)
    grads = [([1.0, 1.0], [2.0]), ([-1.0, 3.0], [0.0]), ([0.0, 0.0], [-4.0])]
    va, vb, pa, pb = [0.0, 0.0], 0.0, [1.0, -2.0], 0.5
    for ga, gb in grads:
        a.grad, b.grad = torch.tensor(ga), torch.tensor(gb)
        opt.step()
        va = [0.5 * v + g for v, g in zip(va, ga)]
        pa = [p - 0.1 * v for p, v in zip(pa, va)]
        vb = 0.5 * vb + gb[0] + 0.5 * pb
        pb = pb - 0.01 * vb
    assert a.tolist() == pytest.approx(pa, abs=1e-6)
    assert b.item() == pytest.approx(pb, abs=1e-6)
    with pytest.raises(ConfigError, match="adamw, sgd"):
        make_optimizer([{"params": [a], "lr": 0.1}], "lion")


def test_trainable_patterns_freeze_every_other_parameter():
    """`model.trainable`: only parameters whose names match a pattern get a group and keep
    requires_grad; the freeze_* flags still apply on top; a pattern that matches nothing or does
    not compile is a ConfigError naming `model.trainable`."""
    import torch

    from thinkvl.config import ConfigError
    from thinkvl.train.common import ModelConfig, param_groups

    def net() -> torch.nn.Module:
        m = torch.nn.Module()
        m.vision_tower = torch.nn.Linear(2, 2)
        m.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])
        m.norm = torch.nn.LayerNorm(2)
        return m

    m = net()
    groups = param_groups(m, ModelConfig(trainable=[r"layers\.1\.", r"^norm\.weight$"]), 1e-3, 0.0)
    trained = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trained == {"layers.1.weight", "layers.1.bias", "norm.weight"}
    assert [g["name"] for g in groups] == ["lm"] and len(groups[0]["params"]) == 3
    m = net()
    groups = param_groups(m, ModelConfig(trainable=["weight"], freeze_vision=True), 1e-3, 0.0)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {"layers.0.weight", "layers.1.weight",
                                                                       "norm.weight"}
    with pytest.raises(ConfigError, match=r"model\.trainable: 'blocks' matches no parameter name"):
        param_groups(net(), ModelConfig(trainable=["layers", "blocks"]), 1e-3, 0.0)
    with pytest.raises(ConfigError, match=r"model\.trainable\[0\]: '\(' is not a regular expression"):
        ModelConfig(trainable=["("]).check("model")
    with pytest.raises(ConfigError, match=r"model\.trainable: an empty list would train nothing"):
        ModelConfig(trainable=[]).check("model")


def test_resume_keeps_the_configs_hyperparameters_and_refuses_another_optimiser(tmp_path):
    """Loading a checkpoint's optimiser state: the moments/buffers are the checkpoint's, the
    hyperparameters this run's config (a new momentum is not silently replaced by the old one);
    state written by the other optimiser, or for other trained parameters, is a ConfigError naming
    the key to change."""
    from thinkvl.config import ConfigError
    from thinkvl.train.common import make_optimizer

    a = Params(torch.ones(3))
    old = make_optimizer([{"params": [a.p0], "lr": 0.1, "weight_decay": 0.0}], "sgd", momentum=0.9)
    a.p0.grad = torch.full((3,), 2.0)
    old.step()

    b = Params(a.p0.detach())
    new = make_optimizer([{"params": [b.p0], "lr": 0.1, "weight_decay": 0.0}], "sgd", momentum=0.5)
    round_trip(tmp_path / "same", a, old, b, new)
    assert new.param_groups[0]["momentum"] == 0.5  # the config's, not the checkpoint's 0.9
    assert torch.equal(new.state[b.p0]["momentum_buffer"], torch.full((3,), 2.0))  # the checkpoint's buffer
    b.p0.grad = torch.zeros(3)
    new.step()  # v = 0.5 * 2 + 0 = 1; q = 0.8 - 0.1 * 1
    assert torch.allclose(b.p0.detach(), torch.full((3,), 0.7))

    c = Params(torch.ones(3))
    adam = make_optimizer([{"params": [c.p0], "lr": 0.1}], "adamw")
    with pytest.raises(ConfigError, match=r"^loss\.optimizer: the checkpoint's optimiser state is sgd's"):
        round_trip(tmp_path / "adam", a, old, c, adam)
    c = Params(torch.ones(4))
    other = make_optimizer([{"params": [c.p0], "lr": 0.1}], "sgd")
    with pytest.raises(ConfigError, match=r"^model\.trainable / model\.freeze_\*: the checkpoint's optimiser state"):
        round_trip(tmp_path / "shape", a, old, c, other)
    two = Params(torch.ones(3), torch.ones(3))
    both = make_optimizer([{"params": [two.p0, two.p1], "lr": 0.1}], "sgd")
    two.p0.grad, two.p1.grad = torch.ones(3), torch.ones(3)
    both.step()
    c = Params(torch.ones(3))
    one = make_optimizer([{"params": [c.p0], "lr": 0.1}], "sgd")
    with pytest.raises(ConfigError, match=r"^model\.trainable"):  # state for a parameter it does not train
        round_trip(tmp_path / "two", two, both, c, one)


def test_never_stepped_optimiser_is_saved_empty_and_resumes_fresh(tmp_path):
    """An optimiser without state (RL skipped every step so far) is checkpointed without any: torch's
    get_state_dict would run its zero-lr initialising step first (AdamW step count 1, a smaller first
    real step). Loading such a checkpoint leaves the new optimiser fresh; the next steps equal the
    uninterrupted run's bit for bit."""
    import json

    from thinkvl.train.common import adamw

    a = Params(torch.linspace(-1, 1, 5))
    first = adamw([{"params": [a.p0], "lr": 0.1, "weight_decay": 0.1}], (0.9, 0.95))
    b = Params(torch.zeros(5))
    second = adamw([{"params": [b.p0], "lr": 0.1, "weight_decay": 0.1}], (0.9, 0.95))
    round_trip(tmp_path, a, first, b, second)
    ckpt = tmp_path / "ckpts" / "step-1"
    assert not first.state and not second.state
    assert not (ckpt / "optim").exists() and json.loads((ckpt / "trainer.json").read_text())["optimizer_state"] is False
    assert torch.equal(b.p0, a.p0)
    for _ in range(2):
        a.p0.grad, b.p0.grad = torch.full((5,), 0.3), torch.full((5,), 0.3)
        first.step()
        second.step()
    assert torch.equal(b.p0, a.p0) and float(second.state[b.p0]["step"]) == 2.0


def test_parameter_without_saved_state_gets_none_on_resume(tmp_path):
    """A parameter that never had a gradient (a vision tower in text-only RL) has no optimiser state in
    the checkpoint; after loading it has none either (not the initialised step-1 state torch fills
    in), so its first real step is a first step, as in the uninterrupted run."""
    from thinkvl.train.common import adamw

    a = Params(torch.ones(3), torch.ones(2))
    first = adamw([{"params": [a.p0, a.p1], "lr": 0.1}], (0.9, 0.95))
    a.p0.grad = torch.full((3,), 0.5)
    first.step()
    b = Params(a.p0.detach(), a.p1.detach())
    second = adamw([{"params": [b.p0, b.p1], "lr": 0.1}], (0.9, 0.95))
    round_trip(tmp_path, a, first, b, second)
    assert set(second.state) == {b.p0} and float(second.state[b.p0]["step"]) == 1.0
    for m, opt in ((a, first), (b, second)):
        m.p0.grad, m.p1.grad = torch.full((3,), 0.2), torch.full((2,), -0.4)
        opt.step()
    assert torch.equal(b.p0, a.p0) and torch.equal(b.p1, a.p1)
