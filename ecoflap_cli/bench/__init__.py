"""Benchmarks and studies, each a script run as ``python -m ecoflap_cli.bench.NAME`` (``--help``).

alloc_study, cuda_check, estimator_study, hybrid_blip2, llmc_env, llmc_runner, offload_memory,
packed_size, quality (the SmolLM2 quality sweep), scoring_cost; ``smollm`` holds the SmolLM2 setup
they share. They use the library as a user would (its public names, or the ``ecoflap`` command
in a subprocess), and nothing in the library or the CLI imports them (tests/test_layers.py).
``llmc_runner`` runs inside llm-compressor's own venv and imports no ecoflap at all.
"""
