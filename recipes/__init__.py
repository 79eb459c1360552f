"""Built-in recipes (YAML), installed as ``sqdeploy.recipes``."""
