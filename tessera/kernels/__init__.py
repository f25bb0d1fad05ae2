"""tessera.kernels"""
