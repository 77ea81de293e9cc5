"""Measurements, one module per family of methods (see METHODS.md)."""
