"""The client's version (kept apart so modules can use it without importing the package)."""

__version__ = "0.1.0"
