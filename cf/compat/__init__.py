"""Compatibility shims installed into the environment by `make install`."""
