"""pyrelay: an asyncio SMTP relay that replaces the Postfix relay container."""

__version__ = "0.1.0"
__all__ = ["__version__"]
