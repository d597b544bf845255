"""Samplers for DiT^DH (method §4): the shifted time grid, Euler / Heun probability-flow ODE, an
Euler–Maruyama SDE, classifier-free guidance and autoguidance.

Time convention: t = 0 is noise, t = 1 the data; the model returns the velocity dx/dt.
"""

from .solvers import METHODS, guided_velocity, sample, time_grid

__all__ = ["METHODS", "guided_velocity", "sample", "time_grid"]
