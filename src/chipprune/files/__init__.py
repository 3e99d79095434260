"""What chipprune reads and writes: model files, scores files, safe file writes."""
