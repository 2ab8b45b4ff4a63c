"""Governance: provider credentials held by LMGate, signing, aliases and policy."""
