"""The presets as data files: one YAML file per ``--kv-cache-dtype`` (kitty_vllm.config reads them)."""
