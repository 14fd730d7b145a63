"""The `ecoflap` command line: parses options, calls the stages, renders to stderr."""

from ecoflap_cli.cli.app import app, main

__all__ = ["app", "main"]
