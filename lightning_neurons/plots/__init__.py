"""Matplotlib figures for the analyses (each returns a ``matplotlib.figure.Figure``)."""
