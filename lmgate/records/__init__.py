"""The usage record and the writers that put records and access lines on disk."""
