"""One controller per endpoint group."""
