"""Configuration: the schema dataclasses (``schema.py``) and, for Hydra entry
points, the YAML preset groups shipped inside the package."""
