"""Mask2Former: config, backbone, deformable-attention pixel decoder, masked-attention decoder,
criterion, post-processing, bundles (`model.bundle`) and the one URI door (`model.storage`).
Plain PyTorch, no Ray.

    from model import build_model, load_bundle, save_bundle
"""

from __future__ import annotations

_EXPORTS = {"Mask2FormerConfig": "model.config", "get_config": "model.config",
            "build_model": "model.mask2former", "load_bundle": "model.bundle",
            "save_bundle": "model.bundle"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # Lazy, so that `model.storage` (every URI of the pipeline) loads without torch.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
