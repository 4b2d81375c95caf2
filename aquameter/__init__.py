"""Aquameter: smart-water telemetry from field protocols to validated readings and analytics."""

__version__ = "0.1.0"
