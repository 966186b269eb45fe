"""Evaluation helpers: writing generated videos to disk (``media``)."""
