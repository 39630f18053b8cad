"""Sequence-parallel attention: Ulysses all-to-all, ring, and their hybrid."""
