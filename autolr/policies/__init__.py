"""Built-in policies, registered through the same hook as third-party plugins."""
