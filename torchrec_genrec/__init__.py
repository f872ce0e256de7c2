"""torchrec-genrec: generative recommendation (HSTU, OneTrans, MUSE, DAS, LUM) on TorchRec.

The top-level package imports nothing heavy, so ``genrec doctor`` can report a broken
torch / fbgemm / torchrec install instead of crashing while importing it.
"""

__version__ = "0.1.0"
