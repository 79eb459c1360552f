"""The exporter: load, calibrate, smooth, quantize, write."""
