"""replicad: the origin of the edge replica, and the sans-IO sync protocol core."""

__version__ = "0.1.0"
