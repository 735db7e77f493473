"""Attribution: output functions, per-sample gradients, projections, feature stores, TRAK scoring,
the attributor that ties them to a model folder, and the baselines."""
