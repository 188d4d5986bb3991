"""Compression (chapter 8): quantization, distillation and pruning, each with what it costs."""
