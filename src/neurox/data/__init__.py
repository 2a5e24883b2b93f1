"""neurox.data"""
