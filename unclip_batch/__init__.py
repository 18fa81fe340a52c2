"""unclip-batch: DALL-E 2 style (unCLIP) generation, variations and inpainting over Parquet manifests on Ray."""

__version__ = "0.1.0"
