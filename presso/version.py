"""presso's version: one module that imports nothing, so the artifact writer can record it
without importing the package's API."""
__version__ = "0.1.0"
