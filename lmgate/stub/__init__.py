"""The stub upstream: deterministic answers in every provider's wire format."""
