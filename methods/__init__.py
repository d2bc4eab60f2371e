"""Built-in methods: one sub-package per method, each exposing ``METHODS``."""
