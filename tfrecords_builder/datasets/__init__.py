"""Dataset layouts the builder reads: one module per dataset."""
