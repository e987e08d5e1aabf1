"""lowbit: make large language models small."""

__version__ = "0.1.0"
