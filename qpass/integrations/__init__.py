"""Integrations with other libraries and offline model packages."""
