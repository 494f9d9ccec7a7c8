"""Tests for saf, mirroring the packages."""
