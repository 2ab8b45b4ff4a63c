"""The upstream side: connection pool and agent, the tee, eager writes, hop-by-hop headers."""
