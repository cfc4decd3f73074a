"""Mask2Former: config, backbone, deformable-attention pixel decoder, masked-attention decoder,
criterion, post-processing and bundles. Pure PyTorch: no Ray, no storage clients.

    from model import build_model, load_bundle, save_bundle
"""

from model.bundle import load_bundle, save_bundle
from model.config import Mask2FormerConfig, get_config
from model.mask2former import build_model

__all__ = ["Mask2FormerConfig", "build_model", "get_config", "load_bundle", "save_bundle"]
