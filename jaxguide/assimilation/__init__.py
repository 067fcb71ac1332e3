"""One assimilation run: settings, the session of compiled programs, video windows,
provenance and the analysis dataset (CF layout).

Imports only from lower layers (observations, diffusion, model, grid, io).
"""
