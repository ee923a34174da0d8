"""The package version (a module of its own, so the server can name it without importing the package API)."""

__version__ = "0.1.0"
