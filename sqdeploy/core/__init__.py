"""The foundation every other layer builds on: errors, quantization schemes and their
integer arithmetic, model families, progress lines, safe output directories and reports.

Nothing here imports another sq-deploy package, so any layer may use it.
"""
