"""Does it attribute correctly? Three layers, each importing only the ones before it:

metric (scores given data; nothing is retrained here)
- lds: the LDS metric from given masks and ground truth (`lds(scores, masks, F)`), its bootstrap,
  lambda sweeps and the published ground truth file;
- quality: sample quality of generated digits (a classifier's confidence and class histogram);
- evidence: every method beside the strong model-free baselines, scored signed, sharpened, by rank
  and by its top 1%.

harness (produces the data: retrains, measurements, the cells of a table)
- retrain: retraining from scratch on subsets, as resumable, shardable jobs;
- lds_run: the retraining run that measures the ground truth; lds_own: the same with checkpoints
  retrained by your own script; lds_evaluation: every method's LDS on a run, with a model
  folder's defaults;
- counterfactual: remove a target's top proponents, retrain, regenerate (live and as a harness);
- tables: the benchmark tables' cells; tuning: the app's lambda per store, chosen on the validation LDS.

report (writes what the harnesses computed)
- tables_report: tables.json / tables.md; lds_own_report: the same for a run of your own checkpoints,
  and its tuned lambdas; counterfactual_report: the counterfactual's summary, Markdown table and
  gallery; study: attribution quality per compute (exact kernels, projection, DAS, EK-FAC).
"""
