"""`auto`: pick the adapter from the input, by domain signatures of the registered adapters."""
