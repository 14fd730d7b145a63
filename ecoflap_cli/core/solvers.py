"""Pure pruning solvers on tensors: statistics, metrics, masks and the SparseGPT update.

Stateless functions in the style of llm-compressor's sparsifiers: make empty statistics,
accumulate a batch of layer inputs into them, then sparsify one weight given its statistics and
an exact number of weights to prune. They know nothing about models, hooks or the CLI.
Masks returned here are boolean with ``True`` meaning *pruned*.
"""

from __future__ import annotations

from typing import Literal

import torch

from ecoflap_cli.core.rounding import largest_remainder

#: All solver maths runs in this precision, whatever the model's dtype.
PRECISION = torch.float32
#: SparseGPT's inverse-Hessian factor (Cholesky, inverse, Cholesky of the inverse) is computed in
#: this precision, then used in ``PRECISION``. Calibration Hessians are ill-conditioned (fewer
#: tokens than inputs; Qwen2's massive activations put the largest eigenvalue 5e4 times above the
#: damping): in float32 the factor's round-off moved the updated weights of Qwen2.5-Coder's last
#: down-projection by 7.4% of their norm against a float64 solve, along directions the calibration
#: tokens barely see (same calibration error, worse perplexity on other text), and made the result
#: depend on summation order. In float64 the float32 update loop matches a float64 solve to 2e-7.
FACTOR_PRECISION = torch.float64

CompareGroup = Literal["row", "matrix"]
SOLVERS = ("wanda", "sparsegpt", "magnitude")


def split_count(total: int, widths: list[int]) -> list[int]:
    """Split a non-negative count across parts in proportion to their widths, summing exactly.

    Largest remainders, ties to the lower index, no caps (a part may get more than its width).
    """
    size = sum(widths)
    if size == 0:
        return [0] * len(widths)
    return largest_remainder([total * w / size for w in widths], None, total)


# --- statistics -----------------------------------------------------------------------------


def empty_col_sq(in_features: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Running sum of squared inputs per input column (Wanda's statistic)."""
    return torch.zeros(in_features, dtype=PRECISION, device=device)


def accumulate_col_sq(col_sq: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Add a batch of layer inputs (any leading shape, last dim = in_features) in place."""
    flat = inputs.reshape(-1, inputs.shape[-1]).to(device=col_sq.device, dtype=PRECISION)
    col_sq += flat.pow(2).sum(dim=0)
    return col_sq


def empty_hessian(in_features: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Running sum of X^T X over calibration tokens (SparseGPT's statistic)."""
    return torch.zeros(in_features, in_features, dtype=PRECISION, device=device)


def accumulate_hessian(hessian: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Add X^T X of a batch of layer inputs in place (unnormalised; the solver rescales)."""
    flat = inputs.reshape(-1, inputs.shape[-1]).to(device=hessian.device, dtype=PRECISION)
    hessian.addmm_(flat.t(), flat)
    return hessian


# --- metrics and masks ----------------------------------------------------------------------


def magnitude_metric(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().to(PRECISION).abs()


def wanda_metric(weight: torch.Tensor, col_sq: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 with the column norm over all calibration tokens."""
    norms = col_sq.to(device=weight.device, dtype=PRECISION).sqrt()
    return weight.detach().to(PRECISION).abs() * norms.unsqueeze(0)


def mask_lowest(metric: torch.Tensor, prune_count: int, group: CompareGroup = "row") -> torch.Tensor:
    """Prune exactly ``prune_count`` entries with the lowest metric.

    ``group="row"`` compares within each output row (rows get floor or ceil of the mean count,
    earlier rows taking the remainder); ``group="matrix"`` compares over the whole tensor. Ties
    are broken by position, so the result is deterministic.
    """
    rows, cols = metric.shape
    if not 0 <= prune_count <= rows * cols:
        raise ValueError(f"prune_count {prune_count} outside [0, {rows * cols}]")
    if group == "matrix":
        order = torch.sort(metric.flatten(), stable=True).indices
        mask = torch.zeros(rows * cols, dtype=torch.bool, device=metric.device)
        mask[order[:prune_count]] = True
        return mask.view(rows, cols)
    if group != "row":
        raise ValueError(f"unknown comparison group {group!r}")
    per_row = torch.full((rows,), prune_count // rows, dtype=torch.long, device=metric.device)
    per_row[: prune_count % rows] += 1
    order = torch.sort(metric, dim=1, stable=True).indices
    ranked = torch.arange(cols, device=metric.device).unsqueeze(0) < per_row.unsqueeze(1)
    mask = torch.zeros_like(ranked)
    mask.scatter_(1, order, ranked)
    return mask


def mask_nm(metric: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M mask: in every run of ``m`` consecutive input weights of a row, keep the ``n`` best."""
    rows, cols = metric.shape
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
    if cols % m:
        raise ValueError(f"N:M {n}:{m} needs the input width ({cols}) to be a multiple of {m}")
    blocks = metric.reshape(rows, cols // m, m)
    drop = torch.sort(blocks, dim=2, stable=True).indices[..., : m - n]
    mask = torch.zeros_like(blocks, dtype=torch.bool)
    mask.scatter_(2, drop, True)
    return mask.reshape(rows, cols)


def apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> None:
    """Zero the pruned entries of a parameter in place."""
    with torch.no_grad():
        weight.masked_fill_(mask.to(weight.device), 0)


# --- SparseGPT ------------------------------------------------------------------------------


def _inverse_hessian_factor(hessian: torch.Tensor, damp: float, retries: int = 6) -> torch.Tensor:
    """Upper Cholesky factor of (H + lambda I)^-1 in ``PRECISION``, computed in
    ``FACTOR_PRECISION``, raising damping until the factorisation works."""
    h = hessian.to(FACTOR_PRECISION)
    mean_diag = torch.diag(h).mean().clamp_min(1e-12)
    eye = torch.eye(h.shape[0], dtype=FACTOR_PRECISION, device=h.device)
    for _ in range(retries):
        try:
            lower = torch.linalg.cholesky(h + damp * mean_diag * eye)
            inverse = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(inverse, upper=True).to(PRECISION)
        except torch.linalg.LinAlgError:
            damp *= 10
    raise ValueError("SparseGPT: the Hessian stays singular after raising the damping")


def sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    prune_count: int,
    *,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh 2023): prune and update the survivors by OBS.

    Returns ``(new_weight, mask)`` in fp32; exactly ``prune_count`` weights are pruned (or N:M
    structure when ``nm`` is given), chosen per block of ``block_size`` input columns.
    """
    w = weight.detach().to(PRECISION).clone()
    rows, cols = w.shape
    h = hessian.to(device=w.device, dtype=PRECISION).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0  # inputs never seen: any value is harmless, keep the factor positive
    hinv = _inverse_hessian_factor(h, damp)
    mask = torch.zeros_like(w, dtype=torch.bool)
    starts = list(range(0, cols, block_size))
    block_counts = split_count(prune_count, [min(block_size, cols - s) for s in starts])
    for start, count in zip(starts, block_counts):
        end = min(start + block_size, cols)
        _sparsegpt_block(w, hinv, mask, start, end, count, nm)
    return w, mask


def _sparsegpt_block(
    w: torch.Tensor,
    hinv: torch.Tensor,
    mask: torch.Tensor,
    start: int,
    end: int,
    count: int,
    nm: tuple[int, int] | None,
) -> None:
    block = w[:, start:end].clone()
    hinv_block = hinv[start:end, start:end]
    errors = torch.zeros_like(block)
    diag = torch.diag(hinv_block)
    block_mask = torch.zeros_like(block, dtype=torch.bool)
    if nm is None:
        saliency = block.pow(2) / diag.pow(2).unsqueeze(0)
        block_mask = mask_lowest(saliency, count, "matrix")
    for i in range(end - start):
        if nm is not None and i % nm[1] == 0:
            span = slice(i, i + nm[1])
            saliency = block[:, span].pow(2) / diag[span].pow(2).unsqueeze(0)
            block_mask[:, span] = mask_nm(saliency, nm[0], nm[1])
        column = block[:, i]
        kept = column.masked_fill(block_mask[:, i], 0.0)
        err = (column - kept) / hinv_block[i, i]
        block[:, i:] -= err.unsqueeze(1) * hinv_block[i, i:].unsqueeze(0)
        block[:, i] = kept
        errors[:, i] = err
    w[:, start:end] = block
    mask[:, start:end] = block_mask
    w[:, end:] -= errors @ hinv[start:end, end:]


# --- the registry's solver functions ----------------------------------------------------------
# Each prunes ``weight`` in place to exactly ``prune_count`` zeros (or N:M structure when ``nm``
# is given) from the statistic its registry entry names. ``group`` is the comparison group.

#: statistic name -> (empty statistic for a layer's input width, accumulate one batch of inputs)
STATISTICS = {"col_sq": (empty_col_sq, accumulate_col_sq), "hessian": (empty_hessian, accumulate_hessian)}


def _mask_by(
    weight: torch.Tensor, metric: torch.Tensor, prune_count: int, group: CompareGroup, nm: tuple[int, int] | None
) -> None:
    mask = mask_nm(metric, *nm) if nm is not None else mask_lowest(metric, prune_count, group)
    apply_mask(weight, mask)


def wanda_prune(
    weight: torch.Tensor,
    col_sq: torch.Tensor | None,
    prune_count: int,
    *,
    group: CompareGroup = "row",
    nm: tuple[int, int] | None = None,
) -> None:
    """Wanda: prune the lowest |W| x ||X_j||_2 within each comparison group."""
    assert col_sq is not None, "wanda needs the input column norms"
    _mask_by(weight, wanda_metric(weight, col_sq), prune_count, group, nm)


def magnitude_prune(
    weight: torch.Tensor,
    _stat: torch.Tensor | None,
    prune_count: int,
    *,
    group: CompareGroup = "row",
    nm: tuple[int, int] | None = None,
) -> None:
    """Magnitude: prune the lowest |W| within each comparison group (no calibration data)."""
    _mask_by(weight, magnitude_metric(weight), prune_count, group, nm)


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    prune_count: int,
    *,
    group: CompareGroup = "row",
    nm: tuple[int, int] | None = None,
    damp: float = 0.01,
    block_size: int = 128,
) -> None:
    """SparseGPT: OBS masks per column block and updates of the surviving weights (fp32 maths)."""
    assert hessian is not None, "sparsegpt needs the input Hessian"
    new_weight, _mask = sparsegpt(weight, hessian, prune_count, nm=nm, block_size=block_size, damp=damp)
    with torch.no_grad():
        weight.copy_(new_weight.to(weight.dtype))
