"""longseq: train Hugging Face causal LMs on very long sequences, exactly."""

from longseq.mesh import Mesh, init_mesh

__all__ = ["Mesh", "init_mesh"]
