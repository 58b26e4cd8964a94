"""Adapters become tokens: rank harmonization, blocking, singular values, update candidates."""
