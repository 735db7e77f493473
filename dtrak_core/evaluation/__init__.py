"""Does it attribute correctly? Sample quality, retraining on subsets, the LDS metric and run,
the counterfactual harness, and the benchmark tables."""
