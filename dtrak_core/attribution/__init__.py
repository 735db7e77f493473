"""Attribution: output functions, per-sample gradients, projections, feature stores, TRAK scoring,
the attributor that ties them to a model folder, the method registry and the baselines.

    output_functions  f(eps_pred, eps, w_t) per timestep, the TRAK family's output functions
    gradients         per-sample gradients of an output function over K timesteps (hooks / vmap)
    projectors        random projections to k dimensions (sparse JL, dense Gaussian)
    batches           what featurizers take as images (tensors, sequences, Datasets, DataLoaders), in fixed batches
    features          FeatureSetting, Featurizer: images (B, C, H, W) -> projected features (B, k);
                      featurize_checkpoints: the same images under several checkpoints
    store             FeatureStore: the training set's (N, k) features on disk, verified
    scoring           TRAKScorer, EnsembleScorer (several checkpoints), SpectralTRAK: features -> scores (Q, N)
    attributor        Attributor: a model, its training set and stores, scored by TRAK
    methods           the registry of every method by name: label, needs, how it scores
    baselines         how each baseline scores, with similarity (dot / cosine, IP norms), tracin
                      (the training run's checkpoints), journey (Journey-TRAK), clip_encoder
    inputs            what the methods need, built once per attributor
    exact, das, kfac  exact kernel TRAK, DAS and EK-FAC influence (studies beside the registry)
"""
