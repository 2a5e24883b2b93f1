"""neurox.train"""
