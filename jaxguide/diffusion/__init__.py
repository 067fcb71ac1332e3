"""EDM sampling and guidance: the sampler, ensembles over members and devices, guidance
methods as transforms of a denoiser, the guided-denoiser factory.

Imports only from jaxguide.model, jaxguide.grid and jaxguide.io.
"""
