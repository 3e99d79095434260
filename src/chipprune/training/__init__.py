"""Training and evaluation: the loop, run folders, precision, processes."""
