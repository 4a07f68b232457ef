"""The package version, in a module of its own so that any module can import it without
importing the package root (whose `load` pulls in the model stack)."""

__version__ = "0.1.0"
