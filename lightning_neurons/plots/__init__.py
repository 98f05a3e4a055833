"""Figures for the analyses: each function returns an RGB image (``[H, W, 3]`` uint8, at most
480 x 720 pixels) drawn to be read at TensorBoard's card size, built with matplotlib's object API
(never ``pyplot`` nor ``matplotlib.use``)."""
