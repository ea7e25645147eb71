"""smtp service."""
