"""Free-text queries: sentences to a dataset's stored query features (docs/text.md)."""
from .encoders import KINDS, EncoderError, EncoderSpec, TextEncoder, encoder_spec, load_encoder

__all__ = ["KINDS", "EncoderError", "EncoderSpec", "TextEncoder", "encoder_spec", "load_encoder"]
