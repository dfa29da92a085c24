"""alignkit: Late-to-Early Training (LET) — align a large student's early layer to a small
pretrained teacher's final layer, with a weight that decays to zero, then drop the teacher."""

__version__ = "0.1.0"
