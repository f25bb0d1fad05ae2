"""tessera.pretrain"""
