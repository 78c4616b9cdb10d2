"""Data acquisition, cropping, bagging and the bag store. Never imports torch."""

__all__ = ["InputError"]

from preprocessing.errors import InputError
