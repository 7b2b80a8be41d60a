"""API keys: their format, their storage, and the `CurrentTeam` dependency that checks them."""
