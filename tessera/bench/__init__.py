"""tessera.bench"""
