"""prvr: a workbench of partially relevant video retrieval methods (GMMFormer v2, MS-SL, GMMFormer v1, a mean-pool floor) on one data, training and metric core."""

__version__ = "0.1.0"
