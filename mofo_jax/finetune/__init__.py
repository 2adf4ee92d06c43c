"""Fine-tuning support: Llama-family model, checkpoint loaders and tokenizer."""
