"""Command-line entry points: thin shells that parse arguments and call the Python API."""
