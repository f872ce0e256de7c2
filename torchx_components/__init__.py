"""TorchX components for torchrec-genrec (registered as ``genrec`` in ``torchx.components``)."""
