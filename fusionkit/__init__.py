"""fusionkit: multimodal text-image fusion models."""

__version__ = "0.1.0"
