"""rtloop: run a VLA policy (OpenVLA-7B) against LIBERO in real time and measure every stage."""

__version__ = "0.1.0"
