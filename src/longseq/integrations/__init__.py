"""longseq inside other training frameworks; each integration imports its framework only when it is imported."""
