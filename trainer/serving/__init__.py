"""Serving: ``twotower export`` (item index and user tower program) and ``twotower retrieve``."""
