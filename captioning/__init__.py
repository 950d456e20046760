"""git-caption's library: everything the four commands (train.py, infer.py, data.py, metrics.py) share.

Imports point one way, from the commands down through this package to its leaves (errors, cli,
strings, hub, workers, progress, flags, presets: no torch, no Hugging Face libraries). The README's
Layout section maps which module owns what.
"""
