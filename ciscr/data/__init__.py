"""Data sources: image/mask I/O, dataset formats, packaged splits, the synthetic generator.

Import the submodules directly (``from ciscr.data.formats import load_dataset``); nothing is
re-exported here so that importing :mod:`ciscr.data` stays cheap.
"""
