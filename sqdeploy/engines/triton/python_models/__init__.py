"""Triton Python-backend models that sq-build copies into model repositories as ``1/model.py``.

They run inside Triton's Python backend (they import ``triton_python_backend_utils``,
which exists only there), so nothing in sq-deploy imports them.
"""
