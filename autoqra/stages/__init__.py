"""Stages of a search that are objects of their own (the final rung)."""
