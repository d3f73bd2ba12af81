"""Framework integrations. Each module imports its framework lazily; none is a hard dependency."""
