"""Pretraining entry points for dist8bit: data, a small GPT, the launcher and a comparison script.

Run them as scripts (`python launch/pretrain.py`, `torchrun ... launch/pretrain.py`,
`python launch/compare.py`); see launch/README.md.
"""
