"""Governance: what LMGate decides about a call beyond relaying it: provider credentials held by LMGate, signing, aliases, limits and policy."""
