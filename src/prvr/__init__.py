"""prvr: GMMFormer v2 for partially relevant video retrieval (library side of the pipeline)."""

__version__ = "0.1.0"
