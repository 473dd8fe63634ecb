"""Clip21 and its baselines over MPI: clipped, error-compensated distributed
optimisation with an HDF5 run log."""

__version__ = "0.1.0"
