"""Who may call: the allow-list, key extraction, the keys command."""
