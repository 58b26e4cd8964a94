"""Runners over the same components: prepare (open, align, size), in-process, and on Ray."""
