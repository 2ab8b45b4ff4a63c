"""Reading usage from provider responses: bytes in, counts out (no twisted.web)."""
