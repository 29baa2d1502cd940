"""EfficientQAT: Block-AP and E2E-QP quantization-aware training for Hugging Face causal LMs."""

from efficientqat.loading import load_quantized
from efficientqat.quantizer import QuantSpec

__all__ = ["QuantSpec", "load_quantized"]
