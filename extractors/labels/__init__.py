"""Auto-labelers: pure, batchable, versioned. Each declares its name, version, inputs and output
fields, and returns LabelRow records carrying provenance and confidence."""
from .base import ClipContext, LabelRow, Labeler, REGISTRY, get_labeler

__all__ = ["ClipContext", "LabelRow", "Labeler", "REGISTRY", "get_labeler"]
