"""Reading and writing model files: Hugging Face folders, the Hub, GGUF."""
