"""Verification: metrics, evaluating analyses against observations and truth, plots.

Imports only from lower layers (assimilation and below).
"""
