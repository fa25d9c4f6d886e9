"""Pictures of what a model does: MIM reconstructions, retrieval examples, charts (PIL only)."""
