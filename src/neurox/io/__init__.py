"""neurox.io"""
