from torchrec_genrec.logging_utils import silence_known_noise

silence_known_noise()
