"""tessera.tokenizers"""
