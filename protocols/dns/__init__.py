"""dns service."""
