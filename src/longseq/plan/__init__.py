"""longseq plan: the memory and time model, and the search for the fastest configuration that fits."""
