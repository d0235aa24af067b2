"""Model-card rendering (placeholder until the Hub issue lands the templates)."""

from __future__ import annotations


def render_adapter_card(config, model=None) -> str:
    return f"---\nlibrary_name: spp-hf\ntags:\n- spp\n- sparse\nbase_model: {config.base_model_name_or_path}\n---\n# SPP adapter\n"
