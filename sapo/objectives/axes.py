"""The names of the fixed axes and options of an objective, in a module without torch: listing and
validating objectives (`sapo train --help`, config validation) must not pay for importing torch.

The math behind each name lives in ratios.py, aggregation.py and kl.py; shapings are open (registry.py).
"""

RATIO_LEVELS = ("token", "sequence", "sequence_token")
AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm", "seq_mean")
KL_ESTIMATORS = ("k1", "k3")
