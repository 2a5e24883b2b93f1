"""Models: the SwiFT backbone, its heads, and converters for published checkpoints."""

from neurox.models.heads import ContrastiveProjection, PooledLinearHead, build_head
from neurox.models.swift import SwiFT, num_parameters

__all__ = ["SwiFT", "build_head", "PooledLinearHead", "ContrastiveProjection", "num_parameters"]
