"""The tabs of a text-to-image model folder (Text to image in the page's navigation bar).

The same views as a pixel folder's where they apply, with a prompt: Generate (prompt + seeds ->
samples), Attribute (a sample or an upload with its prompt -> proponents and opponents, score
histogram, per-class mass, method choice, the score split by noise level, comparison of two methods,
a training image's rank under every method), Benchmarks (the miniature's sample quality and its LDS
results) and About. Remove-and-retrain is not offered here: the Counterfactual tab says why.

Concurrency as in the default app: the loaded folder is shared read-only (sampling is a plain
forward under `no_grad`; the LoRA gradients run on private replicas inside the featurizer, see
`dtrak_core.shared`), and every result is cached by its whole request in an `OnceCache`.

Two layers, both tested without a server: functions of (root, request values) that compute
(`folder`: `generate_samples`, `attribution_for`, `noise_levels`, ...), and the page's handlers
(`handlers`), plain functions of the request values run on the page's folder (`state.bound`), which
`layout.create_ui` and `layout.create_event_handlers` lay out and wire; `benchmarks` is its
Benchmarks tab. The names below are the page's, as `page` and the tests use them.
"""

from dtrak_core.ui.text2image.benchmarks import (
    benchmarks_blocks,
    lds_intro,
    lds_rows,
    quality_rows,
    read_lds,
    results_damage,
)
from dtrak_core.ui.text2image.folder import (
    BASELINES,
    MAX_PROMPT_CHARS,
    NOISE_BUCKETS,
    all_attributions,
    attribute_prompt,
    attribution_for,
    baseline_scores,
    generate_samples,
    load,
    noise_levels,
    parse_guidance,
    parse_prompt,
    prompt_warning,
    query_feature,
    sample_query,
    training_query,
    upload_query,
    with_prompt,
)
from dtrak_core.ui.text2image.handlers import (
    attribute,
    compare,
    counterfactual_text,
    follow_compare,
    header_markdown,
    inspect_training,
    noise_view,
    on_generate,
    prompt_help,
    reprompt,
    select_sample,
    use_training_image,
)
from dtrak_core.ui.text2image.layout import create_event_handlers, create_ui, warm_up

__all__ = ["BASELINES", "MAX_PROMPT_CHARS", "NOISE_BUCKETS", "all_attributions", "attribute", "attribute_prompt", "attribution_for", "baseline_scores", "benchmarks_blocks", "compare", "counterfactual_text", "create_event_handlers", "create_ui", "follow_compare", "generate_samples", "header_markdown", "inspect_training", "lds_intro", "lds_rows", "load", "noise_levels", "noise_view", "on_generate", "parse_guidance", "parse_prompt", "prompt_help", "prompt_warning", "quality_rows", "query_feature", "read_lds", "reprompt", "results_damage", "sample_query", "select_sample", "training_query", "upload_query", "use_training_image", "warm_up", "with_prompt"]
