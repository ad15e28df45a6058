"""The registry: an index and versioned adapter folders (local SQLite, or PostgreSQL + S3), and the adapter-reference
grammar. It stores; it never loads a model."""
