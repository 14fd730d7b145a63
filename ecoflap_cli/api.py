"""The Python API.

from ecoflap_cli.api import load_pruned

model = load_pruned("out/")                      # dense or packed, as written by `ecoflap prune`
"""

from __future__ import annotations

from ecoflap_cli.io.pruned import load_pruned, model_class

__all__ = ["load_pruned", "model_class"]
