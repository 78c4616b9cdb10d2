"""HAMIL: hierarchical aggregation for multi-instance, multi-label classification of image bags."""

__version__ = "0.1.0"
