"""File store adapters."""
