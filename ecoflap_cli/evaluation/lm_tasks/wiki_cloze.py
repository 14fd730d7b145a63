"""Data of the ``wiki_cloze`` task (``wiki_cloze.yaml`` names ``load`` with ``!function``)."""

from __future__ import annotations

from typing import Any


def load(**_settings: Any) -> Any:
    """The task's dataset: the Wikipedia test split's cloze passages, built into the ecoflap
    cache on first use and read with the ``datasets`` JSON loader (no network)."""
    from ecoflap_cli.data.cloze import wiki_cloze_file
    from ecoflap_cli.evaluation.lm_eval_tasks import local_jsonl_dataset

    return local_jsonl_dataset(wiki_cloze_file())
