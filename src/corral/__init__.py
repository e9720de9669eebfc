"""corral: a cluster manager for virtual machines."""

__version__ = "0.1.0"
