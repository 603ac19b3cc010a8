"""The package version, in a module of its own: the kernels' cache key reads it while
``fastsce/__init__.py`` is still importing them."""

__version__ = "0.1.0"
