"""Does it attribute correctly?

- quality: sample quality of generated digits (a classifier's confidence and class histogram);
- retrain: retraining from scratch on subsets, as resumable, shardable jobs;
- lds: the LDS metric from given masks and ground truth (`lds(scores, masks, F)`), the published
  ground truth file; lds_run: the retraining run that measures the ground truth;
  lds_evaluation: every method's LDS on a run, with a model folder's defaults;
- counterfactual: remove a target's top proponents, retrain, regenerate (live and as a harness);
  counterfactual_report: its summary, Markdown table and gallery;
- tables: the benchmark tables' cells; tables_report: tables.json / tables.md; tuning: the app's
  lambda per store, chosen on the validation LDS.
"""
