"""Helpers for the tests (tiny models, local servers): used by tests and benchmarks, never by the library."""
