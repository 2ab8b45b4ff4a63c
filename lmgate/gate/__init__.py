"""The client side: channel limits, the site, routing, the call and its admission."""
