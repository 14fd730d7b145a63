"""docs/methods.md, written from the registries: ``python -m ecoflap_cli.core.docs > docs/methods.md``.

A test compares the file with this output, so the documented options cannot drift from the code.
"""

from __future__ import annotations

from ecoflap_cli.core.methods import ALLOCATORS, RECONSTRUCTION, SCORING, SOLVERS
from ecoflap_cli.core.registry import Param, Registry

_INTRO = """# Methods and their settings

Generated from the registries in `ecoflap_cli/core/methods.py` by
`python -m ecoflap_cli.core.docs > docs/methods.md`; a test keeps the two equal.

Every setting can be given on the command line (its own option where one is listed, else
`--param NAME=VALUE` for allocators, `--solver-param NAME=VALUE` for solvers,
`--recon-param NAME=VALUE` for reconstruction) and in the sweep's method syntax
`ALLOCATOR[-SCORING]:SOLVER[+RECONSTRUCTION]@NAME=VALUE,...` (by name or by the short key).
Values outside the range are refused before any model is loaded.
"""


def _default(param: Param) -> str:
    return "-" if param.default is None else f"`{param.default}`"


def _section(title: str, registry: Registry, lead: str) -> list[str]:
    lines = [f"## {title}", "", lead, ""]
    for entry in registry:
        needs = f" Needs: {entry.needs}." if entry.needs else ""
        scoring = f" Default scoring: `{entry.default_scoring}`." if entry.default_scoring else ""
        lines += [f"### `{entry.name}`", "", f"{entry.summary}{needs}{scoring}", ""]
        if not entry.params:
            lines += ["No settings.", ""]
            continue
        lines += ["| setting | sweep key | option | default | range | meaning |", "|---|---|---|---|---|---|"]
        for p in entry.params:
            lines.append(
                f"| `{p.name}` | {f'`{p.key}`' if p.key else '-'} | {f'`{p.option}`' if p.option else '-'} "
                f"| {_default(p)} | {p.describe_range()} | {p.help} |"
            )
        lines.append("")
    return lines


def methods_markdown() -> str:
    lines = [_INTRO]
    lines += _section(
        "Allocators (`--allocator`)",
        ALLOCATORS,
        "`auto` (the default) chooses `ecoflap` (`owl` for OWL outlier ratios, `search` for search "
        "levels), and records which and why in the plan.",
    )
    lines += _section(
        "Scoring methods (`ecoflap score --method`, `prune --score-method`)",
        SCORING,
        "Scores are one number per block; `owl` gives outlier ratios, read only by the `owl` allocator.",
    )
    lines += _section(
        "Layer-wise solvers (`prune --solver`)",
        SOLVERS,
        "Every solver prunes each tensor to exactly its planned count (or N:M with `--nm`).",
    )
    lines += _section(
        "Reconstruction after masking (`prune --reconstruct`, settings `--recon-param NAME=VALUE`)",
        RECONSTRUCTION,
        "After each block's masks are chosen, Adam fits the kept weights so the pruned block reproduces "
        "the dense block's outputs, masks fixed (docs/reconstruction.md). Sweep syntax: "
        "`ALLOCATOR:SOLVER+NAME@key=value`, e.g. `mix:wanda+sublayer@steps=32`.",
    )
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(methods_markdown(), end="")
