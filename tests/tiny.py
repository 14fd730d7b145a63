"""Tiny model builders for the tests (they live in the package so the device check can use them)."""

from ecoflap_cli.testing import WORDS, make_text, make_tokenizer, save_tiny_model, tiny_config

__all__ = ["WORDS", "make_text", "make_tokenizer", "save_tiny_model", "tiny_config"]
