"""tessera.convert: checkpoint interop with Hugging Face transformers and Meta Chameleon formats."""
