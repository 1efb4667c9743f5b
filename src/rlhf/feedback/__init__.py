"""The human feedback loop: labelling batches, annotation, export of labels as new preference data."""
