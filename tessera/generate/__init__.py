"""tessera.generate"""
