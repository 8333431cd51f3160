"""batchapi"""
