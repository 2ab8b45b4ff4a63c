"""Operating LMGate: metrics, prices, the report."""
