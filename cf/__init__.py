"""cf: the Context Forcing experiment suite."""

__version__ = "0.1.0"
