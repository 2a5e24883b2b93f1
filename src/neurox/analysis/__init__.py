"""neurox.analysis"""
