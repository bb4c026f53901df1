"""fastrelay: a self-hosted, high-performance SMTP relay."""

__version__ = "0.1.0"

__all__ = ["__version__"]
