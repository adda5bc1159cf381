"""Glue between dist8bit optimizers and training frameworks (DeepSpeed).

Each integration is imported lazily: `import dist8bit` never imports the
framework itself, it only arranges for the glue to be installed when the
framework is imported (see `deepspeed.register_on_import`).
"""
