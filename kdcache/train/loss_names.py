"""The names of the losses a student can train with (losses.py implements them), kept free of torch so that the
config schema reads them without loading it."""

KD_KINDS = ("kl", "reverse_kl", "jsd", "soft_ce", "mse", "uld")  # `loss.kind`
LM_TARGETS = ("topk", "sampled", "topk-renorm")  # `loss.targets` of causal-LM students
