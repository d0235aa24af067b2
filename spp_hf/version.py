"""The version of spp-hf (also the package metadata's, through pyproject.toml)."""

__version__ = "0.1.0"
