"""jaxguide: score-based data assimilation with cBottle in JAX."""

__version__ = "0.1.0"
