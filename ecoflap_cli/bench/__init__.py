"""Benchmarks: the SmolLM2 quality sweep (``python -m ecoflap_cli.bench.quality``) and the
llm-compressor peer runner that runs in its own virtual environment."""
