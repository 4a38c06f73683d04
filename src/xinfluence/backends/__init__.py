"""Gradient providers. Each backend module imports its framework only when imported.

* :mod:`xinfluence.backends.numpy`: analytic GLMs and finite differences on any
  array-API namespace;
* :mod:`xinfluence.backends.torch`: ``torch.func`` models;
* :mod:`xinfluence.backends.jax`: ``jax`` models;
* :mod:`xinfluence.backends.cupy`: the array-API providers on cupy arrays.
"""
