"""Getting a model in: Hugging Face folders, GGUF conversion, the embedded
default model, the tokenizer."""
