"""cptkit: continual pretraining of small language models on a team's own domain documents."""

__version__ = "0.1.0"
