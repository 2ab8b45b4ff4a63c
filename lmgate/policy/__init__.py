"""Policy: rules and plugins deciding on calls, the audit trail, exact usage on streams, and traces."""
