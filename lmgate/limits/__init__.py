"""Usage limits: rules, reservations, the stores that count them, and the admission step."""
