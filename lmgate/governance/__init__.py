"""Governance: what LMGate decides about a call beyond relaying it (aliases, provider credentials, policies)."""
