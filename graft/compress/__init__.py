"""Compression: quantization, distillation and pruning (chapter 8)."""
