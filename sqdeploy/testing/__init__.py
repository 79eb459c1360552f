"""Fixtures for tests and device self-checks: tiny random models of every family, random
weights of 7B-class shapes, kernel self-checks and timing helpers.

Shipped so that the GPU self-check and benchmark scripts run from an installed wheel; the
product itself never imports this package.
"""
