"""Built-in rlm plugins."""
