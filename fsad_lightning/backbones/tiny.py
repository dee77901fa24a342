"""Offline tiny twins of the foundation models, for tests and offline demo configs.

They are randomly initialised, built from configs with no download, and loaded back through the very
same loading code users hit with real weights. They are never a silent fallback: a user config gets
them only by naming them explicitly.
"""

from __future__ import annotations

# ==================================================================== tiny CLIP (open_clip)

# ==================================================================== tiny Stable Diffusion (diffusers)
