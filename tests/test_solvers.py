"""Solver properties: exact density per comparison group, N:M structure, SparseGPT's error."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ecoflap_cli.core import solvers


@given(st.integers(1, 12), st.integers(1, 40), st.floats(0.0, 1.0), st.sampled_from(["row", "matrix"]))
@settings(max_examples=150, deadline=None)
def test_mask_lowest_prunes_exact_count_per_group(rows, cols, sparsity, group):
    metric = torch.rand(rows, cols, generator=torch.Generator().manual_seed(rows * 100 + cols))
    count = int(round(rows * cols * sparsity))
    mask = solvers.mask_lowest(metric, count, group)
    assert int(mask.sum()) == count
    if group == "row":
        per_row = mask.sum(dim=1)
        assert int(per_row.max() - per_row.min()) <= 1
        # within each row the pruned entries are the lowest
        for r in range(rows):
            if 0 < per_row[r] < cols:
                assert metric[r][mask[r]].max() <= metric[r][~mask[r]].min()
    elif 0 < count < rows * cols:
        assert metric[mask].max() <= metric[~mask].min()


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4)])
def test_nm_structure(n, m):
    metric = torch.rand(16, 64)
    mask = solvers.mask_nm(metric, n, m)
    kept = (~mask).reshape(16, 64 // m, m).sum(dim=2)
    assert torch.all(kept == n)


def test_nm_rejects_width_not_multiple():
    with pytest.raises(ValueError, match="multiple"):
        solvers.mask_nm(torch.rand(4, 6), 2, 4)


def test_wanda_metric_uses_input_column_norms():
    weight = torch.ones(2, 3)
    stats = solvers.empty_col_sq(3)
    solvers.accumulate_col_sq(stats, torch.tensor([[[1.0, 2.0, 0.0]], [[1.0, 2.0, 0.0]]]))
    metric = solvers.wanda_metric(weight, stats)
    assert torch.allclose(metric[0], torch.tensor([2.0**0.5, 8.0**0.5, 0.0]))
    mask = solvers.mask_lowest(metric, 2, "row")
    assert mask[:, 2].all() and not mask[:, :2].any()


def _correlated_inputs(tokens: int, dim: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(tokens, dim // 4, generator=gen)
    mix = torch.randn(dim // 4, dim, generator=gen)
    # uneven column scales, as in real activations, spread over SparseGPT's column blocks
    scale = torch.logspace(-1, 1, dim)[torch.randperm(dim, generator=gen)]
    return (base @ mix + 0.1 * torch.randn(tokens, dim, generator=gen)) * scale


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(sparsity):
    x = _correlated_inputs(1024, 256)
    weight = torch.randn(48, 256, generator=torch.Generator().manual_seed(1))
    count = int(weight.numel() * sparsity)
    hessian = solvers.accumulate_hessian(solvers.empty_hessian(256), x)
    col_sq = solvers.accumulate_col_sq(solvers.empty_col_sq(256), x)
    reference = x @ weight.t()

    def error(w: torch.Tensor) -> float:
        return float((x @ w.t() - reference).pow(2).mean())

    sgpt, mask = solvers.sparsegpt(weight, hessian, count)  # two 128-column blocks
    assert int((sgpt == 0).sum()) == count and int(mask.sum()) == count
    wanda = weight.masked_fill(solvers.mask_lowest(solvers.wanda_metric(weight, col_sq), count, "row"), 0)
    magnitude = weight.masked_fill(solvers.mask_lowest(solvers.magnitude_metric(weight), count, "row"), 0)
    assert error(sgpt) < error(wanda) < error(magnitude)


def test_sparsegpt_nm_structure_and_dtype_roundtrip():
    x = _correlated_inputs(256, 32)
    weight = torch.randn(8, 32)
    hessian = solvers.accumulate_hessian(solvers.empty_hessian(32), x)
    new, mask = solvers.sparsegpt(weight, hessian, 0, nm=(2, 4))
    kept = (new != 0).reshape(8, 8, 4).sum(dim=2)
    assert torch.all(kept == 2)


def test_sparsegpt_survives_singular_hessian():
    x = torch.zeros(64, 16)
    x[:, :4] = torch.randn(64, 4)  # 12 dead inputs
    hessian = solvers.accumulate_hessian(solvers.empty_hessian(16), x)
    new, _ = solvers.sparsegpt(torch.randn(4, 16), hessian, 32)
    assert int((new == 0).sum()) == 32
    assert torch.isfinite(new).all()


def test_split_count_is_exact():
    assert solvers.split_count(10, [1, 1, 1]) == [4, 3, 3]
    assert sum(solvers.split_count(12345, [7, 13, 100, 1])) == 12345
