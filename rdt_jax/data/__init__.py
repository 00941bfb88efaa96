"""Data pipelines: unified action space, HDF5/RLDS sources, transforms, grain mixtures.

Kept light on purpose: import submodules directly (e.g. ``from rdt_jax.data import action_space``).
"""
