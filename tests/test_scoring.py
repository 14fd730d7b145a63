"""Scoring: zeroth-order against backprop, exact restore, reuse of activations, first-order modes."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import tiny_config
from transformers import AutoModelForCausalLM

from ecoflap_cli.engine.scoring import (
    ZerothOrderSettings,
    first_order_scores,
    owl_outlier_ratios,
    zeroth_order_scores,
)
from ecoflap_cli.models import get_adapter


def _model(family: str = "llama", seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, 128)).to(dtype).eval()
    # spread the blocks' gradient norms so that the ordering is meaningful
    with torch.no_grad():
        for i, layer in enumerate(get_adapter(model).blocks()):
            for lin in layer.linears.values():
                lin.weight.mul_(0.5 + i)
    return model


def _batches(n: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": (ids := torch.randint(0, 128, (2, 16), generator=gen)), "attention_mask": torch.ones_like(ids)}
        for _ in range(n)
    ]


def _spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_zeroth_order_estimates_the_gradient_norm(family):
    model = _model(family)
    adapter = get_adapter(model)
    batches = _batches()
    exact = first_order_scores(adapter, batches, "gradnorm")
    settings = ZerothOrderSettings(eps=1e-3, perturbations=32, seed=1)
    estimate = zeroth_order_scores(adapter, batches, settings)
    names = list(exact)
    # E|z.g| = sqrt(2/pi) ||g|| for Gaussian z: the ratio must sit near 0.80 for every block
    for name in names:
        ratio = estimate[name] / exact[name]
        assert abs(ratio - math.sqrt(2 / math.pi)) < 0.25, (name, ratio)
    # at most one swap of two near-equal blocks
    assert _spearman([exact[n] for n in names], [estimate[n] for n in names]) >= 0.8 - 1e-9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("granularity", ["block", "tensor"])
def test_scoring_leaves_weights_bit_identical(dtype, granularity):
    model = _model(dtype=dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = get_adapter(model)
    zeroth_order_scores(adapter, _batches(2), ZerothOrderSettings(granularity=granularity))
    first_order_scores(adapter, _batches(2), "taylor")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("granularity", ["block", "tensor"])
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_reused_activations_agree_with_full_forward(family, granularity):
    model = _model(family)
    adapter = get_adapter(model)
    batches = _batches()
    fast = zeroth_order_scores(adapter, batches, ZerothOrderSettings(granularity=granularity, seed=3))
    full = zeroth_order_scores(
        adapter, batches, ZerothOrderSettings(granularity=granularity, seed=3, reuse_activations=False)
    )
    for name in fast:
        assert fast[name] == pytest.approx(full[name], rel=1e-4, abs=1e-6)


def test_seeds_make_scores_reproducible():
    adapter = get_adapter(_model())
    a = zeroth_order_scores(adapter, _batches(), ZerothOrderSettings(seed=5))
    b = zeroth_order_scores(adapter, _batches(), ZerothOrderSettings(seed=5))
    c = zeroth_order_scores(adapter, _batches(), ZerothOrderSettings(seed=6))
    assert a == b and a != c


@pytest.mark.parametrize("metric", ["taylor", "gradnorm"])
def test_first_order_checkpointed_matches_plain_backprop(metric):
    adapter = get_adapter(_model("opt"))
    batches = _batches()
    light = first_order_scores(adapter, batches, metric, checkpointing=True)
    plain = first_order_scores(adapter, batches, metric, checkpointing=False)
    for name in light:
        assert light[name] == pytest.approx(plain[name], rel=1e-5)


def test_first_order_taylor_matches_manual_backprop():
    model = _model()
    adapter = get_adapter(model)
    batch = _batches(1)[0]
    scores = first_order_scores(adapter, [batch], "taylor")
    model.zero_grad()
    adapter.loss(batch).backward()
    for block in adapter.blocks():
        manual = sum(float((lin.weight * lin.weight.grad).abs().sum()) for lin in block.linears.values())
        assert scores[block.name] == pytest.approx(manual, rel=1e-5)
    model.zero_grad()


def test_owl_ratios_are_fractions():
    ratios = owl_outlier_ratios(get_adapter(_model()), _batches(2), threshold=2.0)
    assert all(0.0 <= r <= 1.0 for r in ratios.values()) and any(r > 0 for r in ratios.values())


def test_forward_difference_tracks_central_difference():
    adapter = get_adapter(_model())
    batches = _batches()
    central = zeroth_order_scores(adapter, batches, ZerothOrderSettings(seed=2, perturbations=8))
    forward = zeroth_order_scores(adapter, batches, ZerothOrderSettings(seed=2, perturbations=8, difference="forward"))
    for name in central:
        assert forward[name] == pytest.approx(central[name], rel=0.05)


@pytest.mark.parametrize("difference", ["central", "forward"])
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_linearized_head_gives_the_same_estimates_as_the_exact_loss(family, difference):
    """Stopping at the last block and projecting on dL/dh there changes nothing but the cost."""
    model = _model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = get_adapter(model)
    batches = _batches()
    common = dict(seed=4, difference=difference)
    fast = zeroth_order_scores(adapter, batches, ZerothOrderSettings(head="linearized", **common))
    exact = zeroth_order_scores(adapter, batches, ZerothOrderSettings(head="exact", **common))
    assert zeroth_order_scores(adapter, batches, ZerothOrderSettings(**common)) == fast  # auto: linearized
    # central: both are the directional derivative to O(eps^2); forward: each carries its own O(eps)
    # curvature bias (the linearized one only the blocks', not the head's)
    rel = 2e-3 if difference == "central" else 0.1
    for name in exact:
        assert fast[name] == pytest.approx(exact[name], rel=rel, abs=1e-5), name
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # flags put back


def test_linearized_head_refused_where_the_loss_reads_several_towers():
    from ecoflap_cli.errors import PlanError

    adapter = get_adapter(_model())
    adapter.loss_through_last_block = False  # as for CLIP's contrastive loss
    with pytest.raises(PlanError, match="exact head"):
        zeroth_order_scores(adapter, _batches(1), ZerothOrderSettings(head="linearized"))
    # auto falls back to the exact loss
    auto = zeroth_order_scores(adapter, _batches(1), ZerothOrderSettings(seed=1))
    exact = zeroth_order_scores(adapter, _batches(1), ZerothOrderSettings(seed=1, head="exact"))
    assert auto == exact


def test_head_gradient_one_sample_at_a_time_equals_the_whole_batch():
    from ecoflap_cli.engine.scoring import _head_gradient

    adapter = get_adapter(_model())
    final = adapter.blocks()[-1]
    batch = _batches(1)[0]
    batch["labels"] = batch["input_ids"].clone()
    batch["labels"][0, 5:] = -100  # unequal token counts: the samples weigh differently
    whole = _head_gradient(adapter, batch, final, split=False)
    split = _head_gradient(adapter, batch, final, split=True)
    assert adapter.loss_sample_weights(batch)[0] < 0.5
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-8)
