"""Outputs for other runtimes: GGUF files for llama.cpp and Ollama (`hf-vram export --gguf`)."""
