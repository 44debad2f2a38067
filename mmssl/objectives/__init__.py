"""Training objectives: each a module returning a dict of named loss terms ``{"<name>_loss": t}``."""

from mmssl.objectives.contrastive import ContrastiveObjective

__all__ = ["ContrastiveObjective"]
