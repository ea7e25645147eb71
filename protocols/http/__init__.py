"""http service."""
