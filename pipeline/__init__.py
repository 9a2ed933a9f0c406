"""internvl-batch: run InternVL vision-language models over large image collections with Ray Data."""

__version__ = "0.1.0"
