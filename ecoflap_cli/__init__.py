"""ecoflap: coarse-to-fine layer-wise pruning (ECoFLaP) for language and vision-language models."""

__version__ = "0.1.0"
