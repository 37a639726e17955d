"""gradsift: per-sample gradient signals for language-model training data."""

__version__ = "0.1.0"
