"""Style embeddings for Media2Face conditioning: a CLIP model (transformers) loaded from a local
checkpoint directory (save_pretrained layout: config.json, model.safetensors, tokenizer and image
processor files). Text prompts and face images map to one L2-normalised embedding space."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class StyleEncoder:
    def __init__(self, path: str | Path, device: str = "cpu"):
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        p = Path(path)
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"no CLIP checkpoint at {p} (expected a save_pretrained directory)")
        self.model = CLIPModel.from_pretrained(str(p), use_safetensors=True).to(device).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(str(p))
        self.processor = CLIPImageProcessor.from_pretrained(str(p)) if (p / "preprocessor_config.json").is_file() else None
        self.device = device
        self.dim = int(self.model.config.projection_dim)

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> np.ndarray:
        tok = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        e = self.model.get_text_features(**tok)
        return torch.nn.functional.normalize(e, dim=-1).cpu().numpy().astype(np.float32)

    @torch.no_grad()
    def embed_images(self, images: list[np.ndarray]) -> np.ndarray:
        if self.processor is None:
            raise ValueError("this CLIP checkpoint has no image processor (preprocessor_config.json)")
        px = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        e = self.model.get_image_features(pixel_values=px)
        return torch.nn.functional.normalize(e, dim=-1).cpu().numpy().astype(np.float32)
