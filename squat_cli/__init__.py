"""squat: low-bit BERT via Sharpness- and Quantization-Aware Training (SQuAT)."""

__version__ = "0.1.0"
