"""Acceleration: what makes a method faster without changing its result."""
