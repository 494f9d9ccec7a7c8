"""Synthetic, PHI-free sample studies and the generator that makes them."""
