"""The HEALPix grid: orderings and padding (healpix), lat/lon grids and sampling at points (latlon).

The bottom layer of the numerics: imports only jaxguide.io.
"""
