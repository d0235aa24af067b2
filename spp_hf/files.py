"""Deprecated location of the atomic writers: everything on disk is owned by `spp_hf.artifacts`."""

from .artifacts import atomic_dir, atomic_path, atomic_save_safetensors, atomic_write_text

__all__ = ["atomic_dir", "atomic_path", "atomic_save_safetensors", "atomic_write_text"]
