"""Interoperability with other frameworks: Hugging Face GPT-2 / Cerebras-GPT checkpoints (`hf`)."""
