"""Parent models: local Hugging Face directories and embedded packaged models."""
